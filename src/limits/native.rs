//! The shapes nearly every limit uses, compiled from the CEL syntax tree into plain Rust when
//! limits are loaded, so that matching a request needs no CEL context at all:
//!
//! - a lookup, `descriptors[N].key` or `descriptors[N]['key']` (a variable);
//! - `lookup == 'text'`, `lookup != 'text'` (either side), `'key' in descriptors[N]`,
//!   `has(descriptors[N].key)`;
//! - `!`, `&&` and `||` over those.
//!
//! Anything else stays CEL. The answers are CEL's, errors included: reading a key or a
//! descriptor that is not there is an error ([`Missing`]), and `&&` / `||` absorb it exactly as
//! the `cel` crate's interpreter does (expression.rs's tests compare the two on generated
//! expressions and requests).

use cel::common::ast::{Expr, IdedExpr, LiteralValue, operators};

use crate::request::Descriptor;

/// What an expression reads is not in this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Missing;

/// A value a native expression gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Bool(bool),
    Str(&'a str),
}

/// An expression in one of the shapes above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Native {
    /// `descriptors[descriptor][key]`: a string.
    Lookup(Lookup),
    /// `lookup == literal` (`!=` when `negated`).
    Equals {
        lookup: Lookup,
        literal: Box<str>,
        negated: bool,
    },
    /// `'key' in descriptors[N]` / `has(descriptors[N].key)`.
    Has(Lookup),
    Not(Box<Native>),
    And(Box<Native>, Box<Native>),
    Or(Box<Native>, Box<Native>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    descriptor: usize,
    key: Box<str>,
}

impl Lookup {
    fn entries<'a>(
        &self,
        descriptors: &'a [Descriptor],
    ) -> Result<&'a [(String, String)], Missing> {
        descriptors
            .get(self.descriptor)
            .map(|d| d.entries.as_slice())
            .ok_or(Missing)
    }

    /// The entry's value; the last one wins when a key repeats (as in CEL's map of them).
    pub fn read<'a>(&self, descriptors: &'a [Descriptor]) -> Result<Option<&'a str>, Missing> {
        let entries = self.entries(descriptors)?;
        let value = entries.iter().rev().find(|(k, _)| **k == *self.key);
        Ok(value.map(|(_, v)| v.as_str()))
    }
}

impl Native {
    /// The native form of `expression`, if it has one of the supported shapes.
    pub fn compile(expression: &IdedExpr) -> Option<Native> {
        if let Some(lookup) = lookup(expression) {
            return Some(Native::Lookup(lookup));
        }
        match &expression.expr {
            Expr::Select(select) if select.test => Some(Native::Has(Lookup {
                descriptor: descriptor_index(&select.operand)?,
                key: select.field.as_str().into(),
            })),
            Expr::Call(call) if call.target.is_none() => {
                match (call.func_name.as_str(), &call.args[..]) {
                    (operators::LOGICAL_NOT, [operand]) => {
                        Some(Native::Not(Box::new(boolean(operand)?)))
                    }
                    (operators::LOGICAL_AND, [left, right]) => Some(Native::And(
                        Box::new(boolean(left)?),
                        Box::new(boolean(right)?),
                    )),
                    (operators::LOGICAL_OR, [left, right]) => Some(Native::Or(
                        Box::new(boolean(left)?),
                        Box::new(boolean(right)?),
                    )),
                    (operators::EQUALS | operators::NOT_EQUALS, [left, right]) => {
                        let (lookup, literal) = match (lookup(left), lookup(right)) {
                            (Some(lookup), None) => (lookup, string_literal(right)?),
                            (None, Some(lookup)) => (lookup, string_literal(left)?),
                            _ => return None,
                        };
                        Some(Native::Equals {
                            lookup,
                            literal: literal.into(),
                            negated: call.func_name == operators::NOT_EQUALS,
                        })
                    }
                    (operators::IN, [key, map]) => Some(Native::Has(Lookup {
                        descriptor: descriptor_index(map)?,
                        key: string_literal(key)?.into(),
                    })),
                    _ => None,
                }
            }
            _ => None,
        }
    }

    /// `(lookup, literal)` when this is `lookup == literal`: a condition that must hold.
    pub fn required_equality(&self) -> Option<(&Lookup, &str)> {
        match self {
            Native::Equals {
                lookup,
                literal,
                negated: false,
            } => Some((lookup, literal)),
            _ => None,
        }
    }

    /// Evaluates over the request's descriptors, as CEL would.
    pub fn eval<'a>(&self, descriptors: &'a [Descriptor]) -> Result<Value<'a>, Missing> {
        match self {
            Native::Lookup(lookup) => lookup.read(descriptors)?.map(Value::Str).ok_or(Missing),
            Native::Equals {
                lookup,
                literal,
                negated,
            } => {
                let value = lookup.read(descriptors)?.ok_or(Missing)?;
                Ok(Value::Bool((value == &**literal) != *negated))
            }
            Native::Has(lookup) => Ok(Value::Bool(lookup.read(descriptors)?.is_some())),
            Native::Not(operand) => Ok(Value::Bool(!operand.truth(descriptors)?)),
            // The `cel` crate: the left side decides alone when it can; otherwise the right
            // side's error wins, and a left error survives only if the right cannot decide.
            Native::And(left, right) => {
                let left = left.truth(descriptors);
                if left == Ok(false) {
                    return Ok(Value::Bool(false));
                }
                let right = right.truth(descriptors)?;
                match left {
                    Ok(_) => Ok(Value::Bool(right)),
                    Err(_) if !right => Ok(Value::Bool(false)),
                    Err(missing) => Err(missing),
                }
            }
            Native::Or(left, right) => {
                let left = left.truth(descriptors);
                if left == Ok(true) {
                    return Ok(Value::Bool(true));
                }
                let right = right.truth(descriptors)?;
                match left {
                    Ok(_) => Ok(Value::Bool(right)),
                    Err(_) if right => Ok(Value::Bool(true)),
                    Err(missing) => Err(missing),
                }
            }
        }
    }

    /// A boolean sub-expression's value (compile only builds boolean ones there).
    fn truth(&self, descriptors: &[Descriptor]) -> Result<bool, Missing> {
        match self.eval(descriptors)? {
            Value::Bool(b) => Ok(b),
            Value::Str(_) => Err(Missing),
        }
    }
}

/// Compiles a sub-expression that must give a boolean.
fn boolean(expression: &IdedExpr) -> Option<Native> {
    match Native::compile(expression)? {
        Native::Lookup(_) => None,
        native => Some(native),
    }
}

/// `descriptors[N].key` or `descriptors[N]['key']`.
fn lookup(expression: &IdedExpr) -> Option<Lookup> {
    match &expression.expr {
        Expr::Select(select) if !select.test => Some(Lookup {
            descriptor: descriptor_index(&select.operand)?,
            key: select.field.as_str().into(),
        }),
        Expr::Call(call) if call.target.is_none() && call.func_name == operators::INDEX => {
            match &call.args[..] {
                [map, key] => Some(Lookup {
                    descriptor: descriptor_index(map)?,
                    key: string_literal(key)?.into(),
                }),
                _ => None,
            }
        }
        _ => None,
    }
}

/// `N` of `descriptors[N]`, for a literal non-negative N.
fn descriptor_index(expression: &IdedExpr) -> Option<usize> {
    let Expr::Call(call) = &expression.expr else {
        return None;
    };
    if call.target.is_some() || call.func_name != operators::INDEX {
        return None;
    }
    match &call.args[..] {
        [list, index] if matches!(&list.expr, Expr::Ident(name) if name == "descriptors") => {
            match &index.expr {
                Expr::Literal(LiteralValue::Int(i)) => usize::try_from(*i.inner()).ok(),
                _ => None,
            }
        }
        _ => None,
    }
}

fn string_literal(expression: &IdedExpr) -> Option<&str> {
    match &expression.expr {
        Expr::Literal(LiteralValue::String(s)) => Some(s.inner()),
        _ => None,
    }
}
