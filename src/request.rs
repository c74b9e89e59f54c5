//! What a client asks: a namespace, descriptors (lists of key/value entries, each with an
//! optional cost of its own) and a request-level cost, as every adapter hands it to the limiter.

/// Bounds on what one request may carry; beyond them the request is refused with a reason.
/// (`--max-descriptors` and its siblings set them.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestBounds {
    /// Most descriptors in one request (INVALID_ARGUMENT beyond).
    pub max_descriptors: usize,
    /// Most entries in one descriptor (INVALID_ARGUMENT beyond).
    pub max_descriptor_entries: usize,
    /// Longest descriptor key or value, in bytes (INVALID_ARGUMENT beyond).
    pub max_entry_bytes: usize,
    /// Largest gRPC message or HTTP body, in bytes (RESOURCE_EXHAUSTED / 413 beyond).
    pub max_message_bytes: usize,
}

impl Default for RequestBounds {
    fn default() -> Self {
        Self {
            max_descriptors: 64,
            max_descriptor_entries: 64,
            max_entry_bytes: 4096,
            max_message_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Descriptor {
    pub entries: Vec<(String, String)>,
    /// The descriptor's own cost, when the client sent one (even 0).
    pub hits: Option<u64>,
    /// The cost is a refund (Envoy's `is_negative_hits`): given back, not charged.
    pub refund: bool,
    /// A limit the client sent for this descriptor (Envoy's `RateLimitDescriptor.limit`);
    /// only the envoyproxy/ratelimit format reads it.
    pub limit: Option<LimitOverride>,
}

/// A descriptor's own limit: `max_value` per `seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitOverride {
    pub max_value: u64,
    pub seconds: u64,
}

impl Descriptor {
    /// A descriptor of these entries, without a cost of its own.
    pub fn of(entries: &[(&str, &str)]) -> Self {
        Self {
            entries: entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            hits: None,
            refund: false,
            limit: None,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Request {
    pub namespace: String,
    pub descriptors: Vec<Descriptor>,
    /// The request-level cost; 0 means 1.
    pub hits: u64,
}

impl Request {
    /// Refuses requests larger than the configured bounds, saying which bound and by how much.
    pub fn check_bounds(&self, bounds: &RequestBounds) -> Result<(), String> {
        if self.descriptors.len() > bounds.max_descriptors {
            return Err(format!(
                "{} descriptors in one request; at most {} are allowed",
                self.descriptors.len(),
                bounds.max_descriptors
            ));
        }
        let too_long = |what: &str, text: &str| {
            (text.len() > bounds.max_entry_bytes).then(|| {
                format!(
                    "{what} of {} bytes; at most {} are allowed",
                    text.len(),
                    bounds.max_entry_bytes
                )
            })
        };
        if let Some(error) = too_long("namespace", &self.namespace) {
            return Err(error);
        }
        for (i, descriptor) in self.descriptors.iter().enumerate() {
            if descriptor.entries.len() > bounds.max_descriptor_entries {
                return Err(format!(
                    "descriptor {i} has {} entries; at most {} are allowed",
                    descriptor.entries.len(),
                    bounds.max_descriptor_entries
                ));
            }
            for (key, value) in &descriptor.entries {
                if let Some(error) =
                    too_long("descriptor key", key).or_else(|| too_long("descriptor value", value))
                {
                    return Err(format!("descriptor {i}: {error}"));
                }
            }
        }
        Ok(())
    }
}
