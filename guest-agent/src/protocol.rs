//! The command channel's line protocol.
//!
//! The host sends `ID CMD [ARGS]` and the agent answers exactly one line `ID <reply>`.
//! Lines the agent sends on its own start with `* `. `ID` is any token without whitespace
//! (the host's client uses increasing numbers). Commands are case-insensitive.

use std::fmt;

/// One command from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `PING`: liveness and boot id.
    Ping,
    /// `CHECK`: a complete verification pass now.
    Check,
    /// `STATS`: all counters.
    Stats,
    /// `RATE <pages/s>`: set the dirty rate.
    Rate(u64),
    /// `CORRUPT <page>`: flip one byte of a page, bypassing bookkeeping.
    Corrupt(u64),
    /// `PHYS <page>`: guest-physical address of a page.
    Phys(u64),
}

/// A line that is not a valid request. Carries the request id when there was one, so the
/// answer can still be addressed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Nothing but whitespace (ignored, never answered).
    Empty,
    /// An unsolicited line (`* ...`) echoed back, e.g. by a loopback: ignored.
    Unsolicited,
    /// Only an id.
    MissingCommand { id: String },
    /// A command the agent does not know.
    Unknown { id: String, line: String },
    /// A known command with a missing or malformed argument.
    BadArgument { id: String, message: String },
}

impl ParseError {
    /// The answer line to send, if any.
    pub fn reply(&self) -> Option<String> {
        match self {
            ParseError::Empty | ParseError::Unsolicited => None,
            ParseError::MissingCommand { id } => Some(format!("{id} ERR missing command")),
            ParseError::Unknown { id, line } => Some(format!("{id} ERR unknown command {line}")),
            ParseError::BadArgument { id, message } => Some(format!("{id} ERR {message}")),
        }
    }
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reply() {
            Some(r) => f.write_str(&r),
            None => f.write_str("empty or unsolicited line"),
        }
    }
}

fn number(id: &str, cmd: &str, arg: Option<&str>, what: &str) -> Result<u64, ParseError> {
    let bad = |message: String| ParseError::BadArgument {
        id: id.to_string(),
        message,
    };
    let a = arg.ok_or_else(|| bad(format!("{cmd} needs {what}")))?;
    a.parse::<u64>().map_err(|_| {
        bad(format!(
            "{cmd}: {what} must be a non-negative integer, got {a:?}"
        ))
    })
}

/// Parses one request line (without its line terminator).
pub fn parse_line(line: &str) -> Result<(String, Command), ParseError> {
    let line = line.trim();
    if line.is_empty() {
        return Err(ParseError::Empty);
    }
    if line.starts_with('*') {
        return Err(ParseError::Unsolicited);
    }
    let mut parts = line.split_whitespace();
    let id = parts.next().unwrap_or_default().to_string();
    let Some(cmd) = parts.next() else {
        return Err(ParseError::MissingCommand { id });
    };
    let arg = parts.next();
    let extra = parts.next();
    let upper = cmd.to_ascii_uppercase();
    let c = match upper.as_str() {
        "PING" => Command::Ping,
        "CHECK" => Command::Check,
        "STATS" => Command::Stats,
        "RATE" => Command::Rate(number(&id, "RATE", arg, "a rate in pages/s")?),
        "CORRUPT" => Command::Corrupt(number(&id, "CORRUPT", arg, "a page index")?),
        "PHYS" => Command::Phys(number(&id, "PHYS", arg, "a page index")?),
        _ => {
            let rest = line[id.len()..].trim_start().to_string();
            return Err(ParseError::Unknown { id, line: rest });
        }
    };
    let takes_arg = matches!(c, Command::Rate(_) | Command::Corrupt(_) | Command::Phys(_));
    if (!takes_arg && arg.is_some()) || extra.is_some() {
        return Err(ParseError::BadArgument {
            id,
            message: format!("{upper}: too many arguments"),
        });
    }
    Ok((id, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_command() {
        assert_eq!(parse_line("1 PING"), Ok(("1".into(), Command::Ping)));
        assert_eq!(parse_line("2 CHECK\r"), Ok(("2".into(), Command::Check)));
        assert_eq!(
            parse_line("  abc   stats  "),
            Ok(("abc".into(), Command::Stats))
        );
        assert_eq!(
            parse_line("4 RATE 5000"),
            Ok(("4".into(), Command::Rate(5000)))
        );
        assert_eq!(
            parse_line("5 CORRUPT 17"),
            Ok(("5".into(), Command::Corrupt(17)))
        );
        assert_eq!(parse_line("6 PHYS 0"), Ok(("6".into(), Command::Phys(0))));
    }

    #[test]
    fn ignores_empty_and_unsolicited_lines() {
        assert_eq!(parse_line(""), Err(ParseError::Empty));
        assert_eq!(parse_line("   "), Err(ParseError::Empty));
        assert_eq!(
            parse_line("* READY boot_id=1"),
            Err(ParseError::Unsolicited)
        );
        assert_eq!(ParseError::Empty.reply(), None);
    }

    #[test]
    fn errors_are_answered_with_the_id() {
        assert_eq!(
            parse_line("7").unwrap_err().reply().unwrap(),
            "7 ERR missing command"
        );
        assert_eq!(
            parse_line("8 FROB 1 2").unwrap_err().reply().unwrap(),
            "8 ERR unknown command FROB 1 2"
        );
        let e = parse_line("9 RATE").unwrap_err().reply().unwrap();
        assert!(e.starts_with("9 ERR RATE needs"), "{e}");
        let e = parse_line("10 CORRUPT -3").unwrap_err().reply().unwrap();
        assert!(e.starts_with("10 ERR CORRUPT: a page index must be"), "{e}");
        let e = parse_line("11 PING now").unwrap_err().reply().unwrap();
        assert_eq!(e, "11 ERR PING: too many arguments");
        let e = parse_line("12 RATE 1 2").unwrap_err().reply().unwrap();
        assert_eq!(e, "12 ERR RATE: too many arguments");
    }
}
