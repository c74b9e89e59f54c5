//! CEL expressions over a request's descriptors, compiled once when limits are loaded.
//!
//! The context is Limitador's: `descriptors` is a list of string→string maps (one per request
//! descriptor, so `descriptors[0]['user_id']` and `descriptors[0].user_id` both work), and
//! `limit` is `{name, id}` of the limit being evaluated.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel::objects::{Key, Map};
use cel::{Context, Env, ExecutionError, Program, Value};

/// The variables an expression may use.
pub const VARIABLES: [&str; 2] = ["descriptors", "limit"];

static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// A compiled expression and the text it came from.
pub struct Expression {
    source: String,
    program: Program,
}

/// Why an expression could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvalError {
    /// A key or index the expression reads is not in this request: the limit does not apply.
    Missing,
    /// Anything else (wrong type, no such function...): the limit does not apply, and this is
    /// worth telling the operator.
    Failed(String),
}

impl Expression {
    /// Compiles `source`, refusing variables other than [`VARIABLES`] and expressions longer or
    /// deeper than [`MAX_SOURCE_BYTES`] / [`MAX_DEPTH`] (the evaluator recurses per level: a
    /// deep enough expression would overflow the stack and abort the process).
    pub fn compile(source: &str) -> Result<Self, String> {
        if source.len() > MAX_SOURCE_BYTES {
            return Err(format!(
                "expression of {} bytes; at most {MAX_SOURCE_BYTES} are allowed",
                source.len()
            ));
        }
        let program = ENV
            .compile(source)
            .map_err(|e| format!("invalid CEL: {}", e.to_string().trim()))?;
        let depth = depth_of(&program);
        if depth > MAX_DEPTH {
            return Err(format!(
                "expression nested {depth} levels deep; at most {MAX_DEPTH} are allowed"
            ));
        }
        let references = program.references();
        let bound = comprehension_variables(&program);
        if let Some(unknown) = references
            .variables()
            .into_iter()
            .find(|v| !VARIABLES.contains(v) && !bound.iter().any(|b| b == v))
        {
            return Err(format!(
                "unknown variable `{unknown}` (available: {})",
                VARIABLES.join(", ")
            ));
        }
        Ok(Self {
            source: source.to_string(),
            program,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn uses_variable(&self, name: &str) -> bool {
        self.program.references().has_variable(name)
    }

    /// Evaluates a condition: only a boolean answer is accepted.
    pub fn is_true(&self, context: &Context) -> Result<bool, EvalError> {
        match self.execute(context)? {
            Value::Bool(b) => Ok(b),
            other => Err(EvalError::Failed(format!(
                "condition `{}` gave {:?}, not a boolean",
                self.source,
                other.type_of()
            ))),
        }
    }

    /// Evaluates a variable to the string that names its counter.
    pub fn to_key_part(&self, context: &Context) -> Result<String, EvalError> {
        match self.execute(context)? {
            Value::String(s) => Ok(s.as_str().to_string()),
            Value::Int(i) => Ok(i.to_string()),
            Value::UInt(u) => Ok(u.to_string()),
            Value::Float(f) => Ok(f.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            Value::Null => Ok("null".to_string()),
            other => Err(EvalError::Failed(format!(
                "variable `{}` gave {:?}, which cannot name a counter",
                self.source,
                other.type_of()
            ))),
        }
    }

    fn execute(&self, context: &Context) -> Result<Value, EvalError> {
        self.program.execute(context).map_err(|e| match e {
            ExecutionError::NoSuchKey(_) | ExecutionError::IndexOutOfBounds(_) => {
                EvalError::Missing
            }
            other => EvalError::Failed(format!("`{}`: {other}", self.source)),
        })
    }
}

/// The longest expression accepted, in bytes.
pub const MAX_SOURCE_BYTES: usize = 4096;
/// The deepest expression accepted (real limits are 3 to 6 levels deep).
pub const MAX_DEPTH: usize = 32;

/// Names that macros such as `exists(d, ...)` bind inside the expression.
fn comprehension_variables(program: &Program) -> Vec<String> {
    let mut names = Vec::new();
    walk(program, |node| {
        if let cel::common::ast::Expr::Comprehension(c) = &node.expr {
            names.push(c.iter_var.clone());
            names.push(c.accu_var.clone());
        }
    });
    names
}

/// Visits every node of a compiled expression, without recursion.
fn walk(program: &Program, mut visit: impl FnMut(&cel::common::ast::IdedExpr)) {
    depth_walk(program, |node, _| visit(node));
}

/// Depth of a compiled expression.
fn depth_of(program: &Program) -> usize {
    let mut deepest = 0;
    depth_walk(program, |_, depth| deepest = deepest.max(depth));
    deepest
}

/// Visits every node with its depth (the root is 1), without recursion.
fn depth_walk(program: &Program, mut visit: impl FnMut(&cel::common::ast::IdedExpr, usize)) {
    use cel::common::ast::{EntryExpr, Expr};
    let mut pending = vec![(program.expression(), 1usize)];
    while let Some((node, depth)) = pending.pop() {
        visit(node, depth);
        let below = depth + 1;
        match &node.expr {
            Expr::Call(call) => {
                pending.extend(call.target.iter().map(|t| (t.as_ref(), below)));
                pending.extend(call.args.iter().map(|a| (a, below)));
            }
            Expr::Comprehension(c) => pending.extend(
                [
                    &c.iter_range,
                    &c.accu_init,
                    &c.loop_cond,
                    &c.loop_step,
                    &c.result,
                ]
                .into_iter()
                .map(|e| (e, below)),
            ),
            Expr::List(list) => pending.extend(list.elements.iter().map(|e| (e, below))),
            Expr::Map(map) => {
                for entry in &map.entries {
                    if let EntryExpr::MapEntry(e) = &entry.expr {
                        pending.push((&e.key, below));
                        pending.push((&e.value, below));
                    }
                }
            }
            Expr::Struct(s) => {
                for entry in &s.entries {
                    if let EntryExpr::StructField(f) = &entry.expr {
                        pending.push((&f.value, below));
                    }
                }
            }
            Expr::Select(select) => pending.push((select.operand.as_ref(), below)),
            _ => {}
        }
    }
}

/// The CEL value of a request's descriptors: a list of string→string maps.
pub fn descriptors_value<'a, D, E>(descriptors: D) -> Value
where
    D: IntoIterator<Item = E>,
    E: IntoIterator<Item = (&'a str, &'a str)>,
{
    let list = descriptors
        .into_iter()
        .map(|entries| {
            let map: HashMap<Key, Value> = entries
                .into_iter()
                .map(|(k, v)| (Key::from(k), Value::from(v)))
                .collect();
            Value::Map(Map { map: Arc::new(map) })
        })
        .collect::<Vec<_>>();
    Value::List(Arc::new(list))
}

/// The CEL value `limit`: `{name, id}`, null where unset.
pub fn limit_value(name: Option<&str>, id: Option<&str>) -> Value {
    let as_value = |s: Option<&str>| s.map(Value::from).unwrap_or(Value::Null);
    let map: HashMap<Key, Value> = [
        (Key::from("name"), as_value(name)),
        (Key::from("id"), as_value(id)),
    ]
    .into_iter()
    .collect();
    Value::Map(Map { map: Arc::new(map) })
}

/// A root context binding `descriptors`.
pub fn context_for(descriptors: Value) -> Context<'static, 'static> {
    let mut context = Context::with_env(ENV.clone());
    context.add_variable_from_value("descriptors", descriptors);
    context
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(entries: &[(&'static str, &'static str)]) -> Context<'static, 'static> {
        context_for(descriptors_value([entries.iter().copied()]))
    }

    #[test]
    fn reads_descriptors_by_index_and_by_field() {
        let c = ctx(&[("user_id", "alice"), ("tokenlimit.free__065bb34d", "1")]);
        let by_index = Expression::compile("descriptors[0]['user_id']").unwrap();
        let by_field = Expression::compile("descriptors[0].user_id").unwrap();
        assert_eq!(by_index.to_key_part(&c), Ok("alice".into()));
        assert_eq!(by_field.to_key_part(&c), Ok("alice".into()));
        let dotted =
            Expression::compile(r#"descriptors[0]["tokenlimit.free__065bb34d"] == "1""#).unwrap();
        assert_eq!(dotted.is_true(&c), Ok(true));
    }

    #[test]
    fn missing_keys_and_descriptors_are_missing_not_failures() {
        let c = ctx(&[("a", "1")]);
        for source in [
            "descriptors[0]['nope'] == '1'",
            "descriptors[1]['a'] == '1'",
        ] {
            let e = Expression::compile(source).unwrap();
            assert_eq!(e.is_true(&c), Err(EvalError::Missing), "{source}");
        }
    }

    #[test]
    fn type_errors_fail_without_panicking() {
        let c = ctx(&[("a", "1")]);
        let not_bool = Expression::compile("descriptors[0]['a']").unwrap();
        assert!(matches!(not_bool.is_true(&c), Err(EvalError::Failed(_))));
        let bad_compare = Expression::compile("descriptors[0]['a'] > 3").unwrap();
        assert!(matches!(bad_compare.is_true(&c), Err(EvalError::Failed(_))));
        let list = Expression::compile("descriptors").unwrap();
        assert!(matches!(list.to_key_part(&c), Err(EvalError::Failed(_))));
    }

    #[test]
    fn long_or_deep_expressions_are_refused_not_a_crash() {
        let chain = vec!["descriptors[0].a"; 100].join(" + ");
        let err = Expression::compile(&chain).err().unwrap();
        assert!(err.contains("levels deep"), "{err}");
        let long = format!("'{}' == descriptors[0].a", "x".repeat(5000));
        let err = Expression::compile(&long).err().unwrap();
        assert!(err.contains("5022 bytes"), "{err}");
        // Balanced && chains stay shallow and are fine.
        let ands = vec!["descriptors[0].a == 'x'"; 50].join(" && ");
        assert!(Expression::compile(&ands).is_ok());
    }

    #[test]
    fn compile_rejects_garbage_and_unknown_variables() {
        assert!(Expression::compile("descriptors[0][").is_err());
        let err = Expression::compile("request.path == '/'").err().unwrap();
        assert!(err.contains("unknown variable `request`"), "{err}");
        // Variables bound by macros are not unknown.
        let c = ctx(&[("user", "alice")]);
        let exists = Expression::compile("descriptors.exists(d, d.user == 'alice')").unwrap();
        assert_eq!(exists.is_true(&c), Ok(true));
        let unbound = Expression::compile("descriptors.exists(d, e.user == 'x')")
            .err()
            .unwrap();
        assert!(unbound.contains("`e`"), "{unbound}");
    }
}
