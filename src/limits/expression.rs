//! CEL expressions over a request's descriptors, compiled once when limits are loaded.
//!
//! The context is Limitador's: `descriptors` is a list of string→string maps (one per request
//! descriptor, so `descriptors[0]['user_id']` and `descriptors[0].user_id` both work), and
//! `limit` is `{name, id}` of the limit being evaluated. Expressions of the common shapes also
//! get a [`Native`] form that gives the same answers without a CEL context; the context is
//! built for a request only when an expression without one needs it.

use std::borrow::Cow;
use std::cell::OnceCell;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel::objects::{Key, Map};
use cel::{Context, Env, ExecutionError, Program, Value};

use super::native::{self, Native};
use crate::request::Descriptor;

/// The variables an expression may use.
pub const VARIABLES: [&str; 2] = ["descriptors", "limit"];

/// The variables a cost expression (`cost:`) may use: [`VARIABLES`] and `hits`, the cost the
/// call carries.
pub const COST_VARIABLES: [&str; 3] = ["descriptors", "limit", "hits"];

static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// A compiled expression and the text it came from.
pub struct Expression {
    source: String,
    program: Program,
    native: Option<Native>,
    /// Whether it reads the `limit` variable (only then is a scope with it built).
    reads_limit: bool,
}

/// What expressions read for one evaluation: the descriptors, and the CEL context made of them,
/// built on first need.
pub struct Input<'a> {
    descriptors: &'a [Descriptor],
    cel: OnceCell<Context<'static, 'static>>,
}

impl<'a> Input<'a> {
    pub fn new(descriptors: &'a [Descriptor]) -> Self {
        Self {
            descriptors,
            cel: OnceCell::new(),
        }
    }

    fn cel(&self) -> &Context<'static, 'static> {
        self.cel.get_or_init(|| {
            context_for(descriptors_value(
                self.descriptors
                    .iter()
                    .map(|d| d.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
            ))
        })
    }
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
        Self::compile_with(source, &VARIABLES)
    }

    /// Compiles a cost expression (`cost:`): as [`Expression::compile`], with `hits` too. It
    /// is evaluated by [`Expression::cost`] only.
    pub fn compile_cost(source: &str) -> Result<Self, String> {
        let mut expression = Self::compile_with(source, &COST_VARIABLES)?;
        expression.native = None;
        Ok(expression)
    }

    fn compile_with(source: &str, variables: &[&str]) -> Result<Self, String> {
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
            .find(|v| !variables.contains(v) && !bound.iter().any(|b| b == v))
        {
            return Err(format!(
                "unknown variable `{unknown}` (available: {})",
                variables.join(", ")
            ));
        }
        Ok(Self {
            source: source.to_string(),
            native: Native::compile(program.expression()),
            reads_limit: program.references().has_variable("limit"),
            program,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn reads_limit(&self) -> bool {
        self.reads_limit
    }

    /// Whether the expression evaluates without CEL (for tests and benchmarks).
    pub fn is_native(&self) -> bool {
        self.native.is_some()
    }

    pub(crate) fn native(&self) -> Option<&Native> {
        self.native.as_ref()
    }

    /// Evaluates a condition: only a boolean answer is accepted. `limit` is the CEL value of
    /// the limit being evaluated, when the expression reads it.
    pub fn is_true(&self, input: &Input, limit: Option<&Value>) -> Result<bool, EvalError> {
        match self.native.as_ref().map(|n| n.eval(input.descriptors)) {
            Some(Ok(native::Value::Bool(b))) => return Ok(b),
            Some(Err(native::Missing)) => return Err(EvalError::Missing),
            // A string where a boolean is needed: CEL's evaluation words the error.
            Some(Ok(native::Value::Str(_))) | None => {}
        }
        match self.execute(input, limit)? {
            Value::Bool(b) => Ok(b),
            other => Err(EvalError::Failed(format!(
                "condition `{}` gave {:?}, not a boolean",
                self.source,
                other.type_of()
            ))),
        }
    }

    /// Evaluates a variable to the string that names its counter.
    pub fn to_key_part<'a>(
        &self,
        input: &Input<'a>,
        limit: Option<&Value>,
    ) -> Result<Cow<'a, str>, EvalError> {
        match self.native.as_ref().map(|n| n.eval(input.descriptors)) {
            Some(Ok(native::Value::Str(s))) => return Ok(Cow::Borrowed(s)),
            Some(Ok(native::Value::Bool(b))) => return Ok(Cow::Owned(b.to_string())),
            Some(Err(native::Missing)) => return Err(EvalError::Missing),
            None => {}
        }
        match self.execute(input, limit)? {
            Value::String(s) => Ok(Cow::Owned(s.as_str().to_string())),
            Value::Int(i) => Ok(Cow::Owned(i.to_string())),
            Value::UInt(u) => Ok(Cow::Owned(u.to_string())),
            Value::Float(f) => Ok(Cow::Owned(f.to_string())),
            Value::Bool(b) => Ok(Cow::Owned(b.to_string())),
            Value::Null => Ok(Cow::Borrowed("null")),
            other => Err(EvalError::Failed(format!(
                "variable `{}` gave {:?}, which cannot name a counter",
                self.source,
                other.type_of()
            ))),
        }
    }

    /// Evaluates a cost expression to the number to charge, with `hits` the cost the call
    /// carries. A whole number >= 0 is the cost; a double >= 0 is rounded up; anything else
    /// (a negative number, a text, a missing key) is an error, with its reason.
    pub fn cost(&self, input: &Input, limit: Option<&Value>, hits: u64) -> Result<u64, String> {
        let mut scope = input.cel().new_inner_scope();
        scope.add_variable_from_value("hits", Value::UInt(hits));
        if let Some(limit) = limit.filter(|_| self.reads_limit) {
            scope.add_variable_from_value("limit", limit.clone());
        }
        let value = self.program.execute(&scope).map_err(|e| match e {
            ExecutionError::NoSuchKey(key) => format!("no entry {key} in this request"),
            ExecutionError::IndexOutOfBounds(_) => "no such descriptor in this request".into(),
            other => other.to_string(),
        })?;
        match value {
            Value::UInt(cost) => Ok(cost),
            Value::Int(cost) => {
                u64::try_from(cost).map_err(|_| format!("gave {cost}, a negative cost"))
            }
            Value::Float(cost) if cost.is_finite() && cost >= 0.0 => Ok(cost.ceil() as u64),
            Value::Float(cost) => Err(format!("gave {cost}, not a cost")),
            other => Err(format!("gave a {:?}, not a number", other.type_of())),
        }
    }

    /// Evaluates an expression that gives a map (Limitador's `--metric-labels-default`): its
    /// string keys with string values, in key order; other entries are left out, and any other
    /// answer gives no entries.
    pub fn to_string_map(&self, input: &Input) -> Result<Vec<(String, String)>, EvalError> {
        let Value::Map(map) = self.execute(input, None)? else {
            return Ok(Vec::new());
        };
        let mut entries: Vec<(String, String)> = (map.map.iter())
            .filter_map(|(key, value)| match (key, value) {
                (Key::String(k), Value::String(v)) => Some((k.to_string(), v.to_string())),
                _ => None,
            })
            .collect();
        entries.sort();
        Ok(entries)
    }

    fn execute(&self, input: &Input, limit: Option<&Value>) -> Result<Value, EvalError> {
        let context = input.cel();
        let result = match limit.filter(|_| self.reads_limit) {
            Some(limit) => {
                let mut scope = context.new_inner_scope();
                scope.add_variable_from_value("limit", limit.clone());
                self.program.execute(&scope)
            }
            None => self.program.execute(context),
        };
        result.map_err(|e| match e {
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
fn descriptors_value<'a, D, E>(descriptors: D) -> Value
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
fn context_for(descriptors: Value) -> Context<'static, 'static> {
    let mut context = Context::with_env(ENV.clone());
    context.add_variable_from_value("descriptors", descriptors);
    context
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptors(entries: &[(&str, &str)]) -> Vec<Descriptor> {
        vec![Descriptor::of(entries)]
    }

    #[test]
    fn reads_descriptors_by_index_and_by_field() {
        let d = descriptors(&[("user_id", "alice"), ("tokenlimit.free__065bb34d", "1")]);
        let c = Input::new(&d);
        let by_index = Expression::compile("descriptors[0]['user_id']").unwrap();
        let by_field = Expression::compile("descriptors[0].user_id").unwrap();
        assert_eq!(by_index.to_key_part(&c, None), Ok("alice".into()));
        assert_eq!(by_field.to_key_part(&c, None), Ok("alice".into()));
        let dotted =
            Expression::compile(r#"descriptors[0]["tokenlimit.free__065bb34d"] == "1""#).unwrap();
        assert_eq!(dotted.is_true(&c, None), Ok(true));
    }

    #[test]
    fn missing_keys_and_descriptors_are_missing_not_failures() {
        let d = descriptors(&[("a", "1")]);
        let c = Input::new(&d);
        for source in [
            "descriptors[0]['nope'] == '1'",
            "descriptors[1]['a'] == '1'",
        ] {
            let e = Expression::compile(source).unwrap();
            assert_eq!(e.is_true(&c, None), Err(EvalError::Missing), "{source}");
        }
    }

    #[test]
    fn type_errors_fail_without_panicking() {
        let d = descriptors(&[("a", "1")]);
        let c = Input::new(&d);
        let not_bool = Expression::compile("descriptors[0]['a']").unwrap();
        assert!(matches!(
            not_bool.is_true(&c, None),
            Err(EvalError::Failed(_))
        ));
        let bad_compare = Expression::compile("descriptors[0]['a'] > 3").unwrap();
        assert!(matches!(
            bad_compare.is_true(&c, None),
            Err(EvalError::Failed(_))
        ));
        let list = Expression::compile("descriptors").unwrap();
        assert!(matches!(
            list.to_key_part(&c, None),
            Err(EvalError::Failed(_))
        ));
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
        let d = descriptors(&[("user", "alice")]);
        let c = Input::new(&d);
        let exists = Expression::compile("descriptors.exists(d, d.user == 'alice')").unwrap();
        assert_eq!(exists.is_true(&c, None), Ok(true));
        let unbound = Expression::compile("descriptors.exists(d, e.user == 'x')")
            .err()
            .unwrap();
        assert!(unbound.contains("`e`"), "{unbound}");
    }

    #[test]
    fn costs_are_numbers_and_everything_else_is_an_error() {
        let d = descriptors(&[
            ("input", "100"),
            ("output", "20"),
            ("model", "big"),
            ("bad", "x"),
        ]);
        let c = Input::new(&d);
        let cost = |source: &str| Expression::compile_cost(source).unwrap().cost(&c, None, 7);
        assert_eq!(
            cost("uint(descriptors[0].input) + 4u * uint(descriptors[0].output)"),
            Ok(180)
        );
        assert_eq!(cost("hits"), Ok(7));
        assert_eq!(
            cost("descriptors[0].model == 'big' ? 3u * uint(descriptors[0].input) : hits"),
            Ok(300)
        );
        assert_eq!(cost("int(descriptors[0].input) / 3"), Ok(33));
        assert_eq!(
            cost("double(descriptors[0].input) * 0.015"),
            Ok(2),
            "rounded up"
        );
        for failing in [
            "uint(descriptors[0].missing)",
            "uint(descriptors[0].bad)",
            "descriptors[0].model",
            "int(descriptors[0].output) - 50",
            "descriptors[3].input",
            "-1.5",
        ] {
            let e = cost(failing);
            assert!(e.is_err(), "{failing}: {e:?}");
        }
        // `hits` is only for costs.
        assert!(Expression::compile("hits > 3").is_err());
        let e = Expression::compile_cost("tokens + 1").err().unwrap();
        assert!(e.contains("hits"), "{e}");
    }

    /// xorshift64*: deterministic, so a failure names its seed.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[self.below(items.len())]
        }
    }

    fn random_lookup(rng: &mut Rng) -> String {
        let (i, k) = (rng.below(3), rng.pick(&["a", "b", "c"]));
        match rng.below(3) {
            0 => format!("descriptors[{i}].{k}"),
            1 => format!("descriptors[{i}]['{k}']"),
            _ => format!("descriptors[{i}][\"{k}\"]"),
        }
    }

    fn random_condition(rng: &mut Rng, depth: usize) -> String {
        let value = rng.pick(&["x", "y", ""]);
        let leaf = depth == 0 || rng.below(3) == 0;
        if leaf {
            return match rng.below(5) {
                0 => format!("{} == '{value}'", random_lookup(rng)),
                1 => format!("'{value}' == {}", random_lookup(rng)),
                2 => format!("{} != '{value}'", random_lookup(rng)),
                3 => format!(
                    "'{}' in descriptors[{}]",
                    rng.pick(&["a", "b"]),
                    rng.below(3)
                ),
                _ => format!(
                    "has(descriptors[{}].{})",
                    rng.below(3),
                    rng.pick(&["a", "b"])
                ),
            };
        }
        match rng.below(3) {
            0 => format!("!({})", random_condition(rng, depth - 1)),
            1 => format!(
                "({}) && ({})",
                random_condition(rng, depth - 1),
                random_condition(rng, depth - 1)
            ),
            _ => format!(
                "({}) || ({})",
                random_condition(rng, depth - 1),
                random_condition(rng, depth - 1)
            ),
        }
    }

    fn random_descriptors(rng: &mut Rng) -> Vec<Descriptor> {
        (0..rng.below(3))
            .map(|_| Descriptor {
                entries: (0..rng.below(4))
                    .map(|_| {
                        let key = rng.pick(&["a", "b", "c"]);
                        (key.to_string(), rng.pick(&["x", "y", ""]).to_string())
                    })
                    .collect(),
                hits: None,
                refund: false,
                limit: None,
            })
            .collect()
    }

    /// The native form and CEL give the same answers, errors included, on generated
    /// expressions and requests (missing keys and descriptors, repeated keys, &&/|| with
    /// errors on either side, type mismatches).
    #[test]
    fn native_evaluation_answers_as_cel_does() {
        for seed in 1..=3000u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let source = match rng.below(4) {
                0 => random_lookup(&mut rng),
                _ => random_condition(&mut rng, 3),
            };
            let native = Expression::compile(&source).unwrap();
            assert!(native.is_native(), "{source} should have a native form");
            let mut cel = Expression::compile(&source).unwrap();
            cel.native = None;
            for _ in 0..8 {
                let d = random_descriptors(&mut rng);
                let input = Input::new(&d);
                assert_eq!(
                    native.is_true(&input, None),
                    cel.is_true(&input, None),
                    "seed {seed}: `{source}` as a condition over {d:?}"
                );
                assert_eq!(
                    native.to_key_part(&input, None),
                    cel.to_key_part(&input, None),
                    "seed {seed}: `{source}` as a variable over {d:?}"
                );
            }
        }
    }

    #[test]
    fn other_shapes_stay_cel() {
        for source in [
            "descriptors[0].a + 'x' == 'xx'",
            "descriptors[0].a == 1",
            "descriptors.exists(d, d.a == 'x')",
            "descriptors[0].a.startsWith('x')",
            "limit.name == 'x'",
            "size(descriptors) == 1",
        ] {
            let e = Expression::compile(source).unwrap();
            assert!(!e.is_native(), "{source}");
        }
    }
}
