//! One module per subcommand.

pub(crate) mod client;
pub(crate) mod ops;
pub(crate) mod run;
pub(crate) mod send;
pub(crate) mod serve;

/// `KEY=VALUE` from the command line.
pub(crate) fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}
