//! Placeholder: templates land here.
pub const BUILTIN: &[(&str, &str)] = &[("nginx", "")];
