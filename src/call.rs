//! What a call means, in one place: which RPC is asking, what each of its evaluation contexts
//! does with its cost (DESIGN.md "Hits"), what the client is told, and how it counts.
//! Adapters, the limiter and the metrics ask these methods instead of testing variants.

use crate::algorithm::Policy;

/// Which RPC is asking (the HTTP API maps onto the same three).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// Envoy's ShouldRateLimit (and Limitador's HTTP `check_and_report`).
    ShouldRateLimit,
    /// Kuadrant's CheckRateLimit (and HTTP `check`): read-only.
    CheckRateLimit,
    /// Kuadrant's Report (and HTTP `report`): usage that happened, always counted.
    Report,
}

/// How one evaluation context came to be: the whole request (Limitador's path, no descriptor
/// carries a cost of its own) or one descriptor (Envoy's per-descriptor `hits_addend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Context {
    /// The request as a whole, with the request-level cost (0 means 1).
    Request { hits: u64 },
    /// One descriptor: its own cost when it sent one (even 0), else the request's; a refund
    /// when it says so (Envoy's `is_negative_hits`).
    Descriptor {
        hits: Option<u64>,
        request_hits: u64,
        refund: bool,
    },
}

/// How a decision went, for a group of counters or for the whole call: the one notion of
/// "over" every consumer reads. Ordered: a call is as bad as its worst group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Verdict {
    /// Admitted (or, for a charge, still within the limit).
    #[default]
    Admitted,
    /// Usage that already happened was charged and went past a limit: it was served.
    ChargedPast,
    /// Refused: a check, or an all-or-nothing charge, that a limit did not admit.
    Refused,
    /// The request cannot be judged (an empty namespace).
    Unknown,
}

impl Verdict {
    /// How a group with `policy` went: a charge for usage that happened was served even when
    /// the storage says it did not fit; anything else that did not fit was refused.
    pub fn of(policy: Policy, admitted: bool) -> Self {
        match (admitted, policy) {
            (true, _) => Verdict::Admitted,
            (false, Policy::Charge) => Verdict::ChargedPast,
            (false, _) => Verdict::Refused,
        }
    }
}

/// What the client is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Ok,
    OverLimit,
    Unknown,
}

impl Call {
    pub const ALL: [Call; 3] = [Call::ShouldRateLimit, Call::CheckRateLimit, Call::Report];

    /// The gRPC method's name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Call::ShouldRateLimit => "ShouldRateLimit",
            Call::CheckRateLimit => "CheckRateLimit",
            Call::Report => "Report",
        }
    }

    /// What one context of this call does, and with which cost.
    pub fn policy(self, context: Context) -> (Policy, u64) {
        match context {
            Context::Request { hits } => {
                let cost = hits.max(1);
                let policy = match self {
                    Call::ShouldRateLimit => Policy::AllOrNothing,
                    Call::CheckRateLimit => Policy::CheckOnly,
                    Call::Report => Policy::Charge,
                };
                (policy, cost)
            }
            Context::Descriptor {
                hits,
                request_hits,
                refund,
            } => {
                let cost = hits.unwrap_or(request_hits.max(1));
                match self {
                    // A read-only call changes nothing, not even by a refund: it asks nothing.
                    Call::CheckRateLimit if refund => (Policy::CheckOnly, 0),
                    // A refund gives back exactly what it carries, whoever sends it.
                    _ if refund => (Policy::Refund, cost),
                    // Envoy: a present 0 is a pure check; any other cost is usage to count.
                    Call::ShouldRateLimit if cost == 0 => (Policy::CheckOnly, 0),
                    Call::ShouldRateLimit => (Policy::Charge, cost),
                    Call::CheckRateLimit => (Policy::CheckOnly, cost),
                    Call::Report => (Policy::Charge, cost.max(1)),
                }
            }
        }
    }

    /// What the client is told for a verdict: a report always answers OK (the usage
    /// happened, whatever the limit says).
    pub fn code(self, verdict: Verdict) -> Code {
        match verdict {
            Verdict::Unknown => Code::Unknown,
            Verdict::Admitted => Code::Ok,
            Verdict::ChargedPast | Verdict::Refused if self == Call::Report => Code::Ok,
            Verdict::ChargedPast | Verdict::Refused => Code::OverLimit,
        }
    }

    /// Whether the call asks for admission, so Limitador counts it in `authorized_calls` or
    /// `limited_calls` (a report only adds hits).
    pub fn asks_admission(self) -> bool {
        self != Call::Report
    }

    /// Whether the cost of a served call counts as `authorized_hits` (a read-only check
    /// charges nothing).
    pub fn charges(self) -> bool {
        self != Call::CheckRateLimit
    }

    /// Whether answers carry rate limit headers when asked to (a report's answer has no
    /// client waiting on it).
    pub fn has_headers(self) -> bool {
        self != Call::Report
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_is_never_answered_over_limit() {
        for verdict in [Verdict::Admitted, Verdict::ChargedPast, Verdict::Refused] {
            assert_eq!(Call::Report.code(verdict), Code::Ok);
        }
        assert_eq!(Call::Report.code(Verdict::Unknown), Code::Unknown);
        assert_eq!(
            Call::ShouldRateLimit.code(Verdict::ChargedPast),
            Code::OverLimit
        );
    }

    #[test]
    fn policies_follow_the_design() {
        let whole = |hits| Context::Request { hits };
        let own = |hits| Context::Descriptor {
            hits,
            request_hits: 0,
            refund: false,
        };
        let refund = |hits| Context::Descriptor {
            hits,
            request_hits: 0,
            refund: true,
        };
        assert_eq!(
            Call::ShouldRateLimit.policy(refund(Some(150))),
            (Policy::Refund, 150)
        );
        assert_eq!(Call::Report.policy(refund(Some(0))), (Policy::Refund, 0));
        assert_eq!(
            Call::CheckRateLimit.policy(refund(Some(150))),
            (Policy::CheckOnly, 0)
        );
        assert_eq!(
            Call::ShouldRateLimit.policy(whole(0)),
            (Policy::AllOrNothing, 1)
        );
        assert_eq!(Call::Report.policy(whole(5)), (Policy::Charge, 5));
        assert_eq!(
            Call::ShouldRateLimit.policy(own(Some(0))),
            (Policy::CheckOnly, 0)
        );
        assert_eq!(
            Call::ShouldRateLimit.policy(own(Some(7))),
            (Policy::Charge, 7)
        );
        assert_eq!(Call::ShouldRateLimit.policy(own(None)), (Policy::Charge, 1));
        assert_eq!(Call::Report.policy(own(Some(0))), (Policy::Charge, 1));
        assert_eq!(
            Call::CheckRateLimit.policy(own(Some(0))),
            (Policy::CheckOnly, 0)
        );
    }

    #[test]
    fn the_worst_group_decides() {
        assert!(Verdict::Refused > Verdict::ChargedPast);
        assert!(Verdict::ChargedPast > Verdict::Admitted);
    }
}
