//! What a call means, in one place: which RPC is asking, what each of its evaluation contexts
//! does with its cost (DESIGN.md "Hits"), what the client is told, and how it counts.
//! Adapters, the limiter and the metrics ask these methods instead of testing variants.

use crate::algorithm::Policy;

/// Which RPC is asking (the HTTP API maps onto the same ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// Envoy's ShouldRateLimit (and Limitador's HTTP `check_and_report`).
    ShouldRateLimit,
    /// Kuadrant's CheckRateLimit (and HTTP `check`): read-only.
    CheckRateLimit,
    /// Kuadrant's Report (and HTTP `report`): usage that happened, always counted.
    Report,
    /// Kuadrant's Reserve (and HTTP `reserve`): all or nothing, holds the amount (the request
    /// cost, 0 holding nothing) on every counter; charges nothing.
    Reserve,
    /// Kuadrant's Commit (and HTTP `commit`): charges the actual amount (the request cost, 0
    /// charging nothing) and releases the reservation's holds.
    Commit,
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
            // A commit's "admitted" says whether it released a hold; it refuses nothing.
            (false, Policy::Commit) => Verdict::Admitted,
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
    pub const ALL: [Call; 5] = [
        Call::ShouldRateLimit,
        Call::CheckRateLimit,
        Call::Report,
        Call::Reserve,
        Call::Commit,
    ];

    /// The gRPC method's name, for logs and metric labels.
    pub fn name(self) -> &'static str {
        match self {
            Call::ShouldRateLimit => "ShouldRateLimit",
            Call::CheckRateLimit => "CheckRateLimit",
            Call::Report => "Report",
            Call::Reserve => "Reserve",
            Call::Commit => "Commit",
        }
    }

    /// The gRPC service (full name) and method that carry it.
    pub fn grpc_method(self) -> (&'static str, &'static str) {
        let service = match self {
            Call::ShouldRateLimit => "envoy.service.ratelimit.v3.RateLimitService",
            _ => "kuadrant.service.ratelimit.v1.RateLimitService",
        };
        (service, self.name())
    }

    /// Whether the whole request is one context whatever its descriptors carry (a reservation
    /// is all or nothing across every counter its limits select).
    pub fn whole_request(self) -> bool {
        matches!(self, Call::Reserve | Call::Commit)
    }

    /// What one context of this call does, and with which cost.
    pub fn policy(self, context: Context) -> (Policy, u64) {
        // The amounts of a reservation are taken as they are: 0 holds (or charges) nothing.
        match (self, context) {
            (Call::Reserve, Context::Request { hits }) => return (Policy::Reserve, hits),
            (Call::Commit, Context::Request { hits }) => return (Policy::Commit, hits),
            _ => {}
        }
        match context {
            Context::Request { hits } => {
                let cost = hits.max(1);
                let policy = match self {
                    Call::ShouldRateLimit => Policy::AllOrNothing,
                    Call::CheckRateLimit => Policy::CheckOnly,
                    Call::Report => Policy::Charge,
                    Call::Reserve => Policy::Reserve,
                    Call::Commit => Policy::Commit,
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
                    // (The planner makes reservations one context of the whole request.)
                    Call::Reserve => (Policy::Reserve, cost),
                    Call::Commit => (Policy::Commit, cost),
                }
            }
        }
    }

    /// Whether in-flight (concurrency) limits apply to the call. Not to a Report: it tells the
    /// usage of a request that has ended, which neither starts a request nor ends one (a slot
    /// taken by it would block a key for `seconds`; see docs/in-flight-limits.md).
    pub fn selects_slots(self) -> bool {
        !matches!(self, Call::Report)
    }

    /// What the client is told for a verdict: a report or a commit always answers OK (the
    /// usage happened, whatever the limit says).
    pub fn code(self, verdict: Verdict) -> Code {
        match verdict {
            Verdict::Unknown => Code::Unknown,
            Verdict::Admitted => Code::Ok,
            Verdict::ChargedPast | Verdict::Refused if !self.asks_admission() => Code::Ok,
            Verdict::ChargedPast | Verdict::Refused => Code::OverLimit,
        }
    }

    /// Whether the call asks for admission, so Limitador counts it in `authorized_calls` or
    /// `limited_calls` (a report or a commit only adds hits).
    pub fn asks_admission(self) -> bool {
        !matches!(self, Call::Report | Call::Commit)
    }

    /// Whether the cost of a served call counts as `authorized_hits` (a read-only check, and a
    /// reservation, which only holds, charge nothing).
    pub fn charges(self) -> bool {
        !matches!(self, Call::CheckRateLimit | Call::Reserve)
    }

    /// Whether answers carry rate limit headers when asked to (a report's or a commit's
    /// answer has no client waiting on it).
    pub fn has_headers(self) -> bool {
        !matches!(self, Call::Report | Call::Commit)
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
        assert_eq!(Call::Reserve.policy(whole(0)), (Policy::Reserve, 0));
        assert_eq!(
            Call::Commit.policy(whole(0)),
            (Policy::Commit, 0),
            "0 is not 1"
        );
        assert_eq!(Call::Commit.code(Verdict::Refused), Code::Ok);
        assert_eq!(Call::Reserve.code(Verdict::Refused), Code::OverLimit);
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
