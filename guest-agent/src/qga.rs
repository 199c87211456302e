//! The QEMU guest agent's wire protocol, as much of it as libvirt needs to carry the lab
//! agent's commands: on Nova's guest-agent channel (`org.qemu.guest_agent.0`) libvirt is
//! the channel's only client, so the host reaches the agent through libvirt's
//! `virDomainQemuAgentCommand` (`virsh qemu-agent-command`).
//!
//! - Requests are JSON objects, one per line: `{"execute": NAME, "arguments": {...}}`.
//!   libvirt precedes every command with `guest-sync` (`{"return": ID}` expected back,
//!   anything else before it is skipped as garbage); a 0xFF byte before a request (the
//!   `guest-sync-delimited` reset) is ignored.
//! - `guest-ping` answers `{"return": {}}`; `vmbeam-command` with `{"line": "CHECK"}`
//!   runs one line of the agent's own protocol and answers `{"return": {"line": ANSWER}}`
//!   (the answer without its id); anything else is `CommandNotFound`.
//! - Nothing unsolicited is ever written: libvirt would take it for a broken agent.

/// One request, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum QgaRequest {
    /// `guest-sync` with its id.
    Sync(i64),
    /// `guest-ping`.
    Ping,
    /// `vmbeam-command`: a line of the agent's own protocol (without id).
    Command(String),
    /// Anything else, with its name (empty: not a request at all).
    Unknown(String),
}

/// The name libvirt's commands reach the agent's own protocol with.
pub const COMMAND: &str = "vmbeam-command";

/// Parses one received line.
pub fn parse(line: &str) -> QgaRequest {
    let line = line.trim_start_matches(['\u{ff}', '\u{fffd}', ' ', '\t']);
    let Some(execute) = string_field(line, "execute") else {
        return QgaRequest::Unknown(String::new());
    };
    match execute.as_str() {
        "guest-sync" => match number_field(line, "id") {
            Some(id) => QgaRequest::Sync(id),
            None => QgaRequest::Unknown(execute),
        },
        "guest-ping" => QgaRequest::Ping,
        COMMAND => match string_field(line, "line") {
            Some(l) => QgaRequest::Command(l),
            None => QgaRequest::Unknown(execute),
        },
        _ => QgaRequest::Unknown(execute),
    }
}

/// Whether a received line is a QGA request (a JSON object), not a line of the agent's
/// own protocol.
pub fn is_request(line: &str) -> bool {
    line.trim_start_matches(['\u{ff}', '\u{fffd}', ' ', '\t'])
        .starts_with('{')
}

/// `{"return": ID}`.
pub fn sync_reply(id: i64) -> String {
    format!("{{\"return\": {id}}}")
}

/// `{"return": {}}`.
pub fn empty_reply() -> String {
    "{\"return\": {}}".to_string()
}

/// `{"return": {"line": LINE}}`.
pub fn line_reply(line: &str) -> String {
    format!("{{\"return\": {{\"line\": {}}}}}", quote(line))
}

/// The error QEMU's agent gives for a command it does not have.
pub fn not_found(name: &str) -> String {
    format!(
        "{{\"error\": {{\"class\": \"CommandNotFound\", \"desc\": {}}}}}",
        quote(&format!("The command {name} has not been found"))
    )
}

/// A JSON string literal.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The position just after `"key"` and the `:` that follows it.
fn after_key(json: &str, key: &str) -> Option<usize> {
    let pat = format!("\"{key}\"");
    let mut from = 0;
    while let Some(i) = json[from..].find(&pat) {
        let end = from + i + pat.len();
        let rest = &json[end..];
        let trimmed = rest.trim_start();
        if let Some(r) = trimmed.strip_prefix(':') {
            return Some(json.len() - r.len());
        }
        from = end;
    }
    None
}

/// The string value of the first `"key": "..."` (escapes decoded).
fn string_field(json: &str, key: &str) -> Option<String> {
    let at = after_key(json, key)?;
    let rest = json[at..].trim_start().strip_prefix('"')?;
    let mut out = String::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                'r' => out.push('\r'),
                't' => out.push('\t'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).ok()?)?);
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

/// The integer value of the first `"key": N`.
fn number_field(json: &str, key: &str) -> Option<i64> {
    let at = after_key(json, key)?;
    let rest = json[at..].trim_start();
    let end = rest
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
        .map_or(rest.len(), |(i, _)| i);
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirts_requests_parse() {
        // As libvirt 11's qemu_agent.c writes them.
        assert_eq!(
            parse(r#"{"execute":"guest-sync", "arguments":{"id":1764712345123}}"#),
            QgaRequest::Sync(1764712345123)
        );
        assert_eq!(
            parse("\u{fffd}{\"execute\": \"guest-ping\"}"),
            QgaRequest::Ping
        );
        assert_eq!(
            parse(r#"{"execute":"vmbeam-command","arguments":{"line":"CHECK"}}"#),
            QgaRequest::Command("CHECK".into())
        );
        assert_eq!(
            parse(r#"{"arguments": {"line": "RATE \"5\""}, "execute": "vmbeam-command"}"#),
            QgaRequest::Command("RATE \"5\"".into())
        );
        assert_eq!(
            parse(r#"{"execute":"guest-info"}"#),
            QgaRequest::Unknown("guest-info".into())
        );
        assert_eq!(parse("1 CHECK"), QgaRequest::Unknown(String::new()));
        assert_eq!(
            parse(r#"{"execute":"guest-sync"}"#),
            QgaRequest::Unknown("guest-sync".into())
        );
        assert!(is_request("\u{ff}{\"execute\":\"guest-ping\"}"));
        assert!(!is_request("1 PING"));
    }

    #[test]
    fn replies_are_json() {
        assert_eq!(sync_reply(42), r#"{"return": 42}"#);
        assert_eq!(empty_reply(), r#"{"return": {}}"#);
        assert_eq!(
            line_reply("CHECK PASS pages=3 \"x\"\\"),
            r#"{"return": {"line": "CHECK PASS pages=3 \"x\"\\"}}"#
        );
        assert_eq!(
            not_found("guest-info"),
            r#"{"error": {"class": "CommandNotFound", "desc": "The command guest-info has not been found"}}"#
        );
        assert_eq!(quote("a\u{1}b\n"), r#""a\u0001b\n""#);
    }
}
