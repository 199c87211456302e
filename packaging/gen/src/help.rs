//! Rebuilds a `clap::Command` from a clap program's `--help` output, recursively.
//!
//! Stopgap: `vmbeam-cli` has no library target, so its `clap::Command` cannot be imported.
//! Once it exports `pub fn command() -> clap::Command` (clap's `CommandFactory::command()`),
//! `main.rs` uses that instead and this module goes away. Until then the help text is parsed
//! strictly: anything not recognised is an error, never a silently thinner man page.

use std::fmt;
use std::path::Path;
use std::process::Command as Process;

use clap::builder::PossibleValue;
use clap::{Arg, ArgAction, Command, ValueHint};

/// A help text this parser does not understand, with the line at fault.
#[derive(Debug)]
pub struct ParseError {
    program: String,
    message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.program, self.message)
    }
}

impl std::error::Error for ParseError {}

/// One entry of a help section: its left column and its description.
#[derive(Debug, Default, Clone)]
struct Entry {
    spec: String,
    desc: Vec<String>,
}

/// A parsed help page.
#[derive(Debug, Default)]
struct Page {
    about: Vec<String>,
    /// (heading, entries) in order: "Commands", "Arguments", "Options" or custom headings.
    sections: Vec<(String, Vec<Entry>)>,
    after: Vec<String>,
    /// Long options the usage line shows outside brackets: required ones.
    required: Vec<String>,
}

/// Runs `bin PATH... --help` for `path` and every subcommand below it, returning the command
/// tree. `name` is the program name to use (the binary's file name).
pub fn command_from_binary(bin: &Path, name: &str) -> Result<Command, Box<dyn std::error::Error>> {
    let version = run(bin, &["--version"])?;
    let version = version
        .trim()
        .strip_prefix(name)
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("{name} --version printed {version:?}"))?
        .to_string();
    build(bin, name, &version, &[])
}

fn run(bin: &Path, args: &[&str]) -> Result<String, Box<dyn std::error::Error>> {
    let out = Process::new(bin)
        .args(args)
        .env("NO_COLOR", "1")
        .env("CLICOLOR", "0")
        .env_remove("CLICOLOR_FORCE")
        .output()
        .map_err(|e| format!("run {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {} failed ({}): {}",
            bin.display(),
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The command at `path` below `name`, every command carrying the program's `version`.
fn build(
    bin: &Path,
    name: &str,
    version: &str,
    path: &[String],
) -> Result<Command, Box<dyn std::error::Error>> {
    let mut argv: Vec<&str> = path.iter().map(String::as_str).collect();
    argv.push("--help");
    let program = std::iter::once(name)
        .chain(path.iter().map(String::as_str))
        .collect::<Vec<_>>()
        .join(" ");
    let text = run(bin, &argv)?;
    let page = parse(&text).map_err(|message| ParseError {
        program: program.clone(),
        message,
    })?;
    let leaf = path.last().map(String::as_str).unwrap_or(name).to_string();
    let mut cmd = Command::new(leaf)
        .version(version.to_string())
        .disable_help_flag(true)
        .disable_version_flag(true)
        .disable_help_subcommand(true);
    if let Some((first, rest)) = page.about.split_first() {
        cmd = cmd.about(first.clone());
        if !rest.is_empty() {
            cmd = cmd.long_about(page.about.join("\n\n"));
        }
    }
    if !page.after.is_empty() {
        cmd = cmd.after_help(page.after.join("\n"));
    }
    for (heading, entries) in &page.sections {
        for e in entries {
            match heading.as_str() {
                "Commands" => {
                    let (sub_name, _) = split_spec_aliases(&e.spec);
                    if sub_name == "help" {
                        // clap's own `help` subcommand: not a page of its own.
                        continue;
                    }
                    let mut sub_path = path.to_vec();
                    sub_path.push(sub_name.clone());
                    let mut sub = build(bin, name, version, &sub_path)?;
                    let (desc, extras) = split_extras(&e.desc);
                    if let Some(aliases) = extras.aliases {
                        sub = sub.visible_aliases(aliases);
                    }
                    if sub.get_about().is_none() && !desc.is_empty() {
                        sub = sub.about(desc);
                    }
                    cmd = cmd.subcommand(sub);
                }
                "Arguments" => cmd = cmd.arg(positional(e).map_err(|m| perr(&program, m))?),
                _ => {
                    let mut arg = option(e).map_err(|m| perr(&program, m))?;
                    if arg
                        .get_long()
                        .is_some_and(|l| page.required.iter().any(|r| r == l))
                    {
                        arg = arg.required(true);
                    }
                    if heading != "Options" {
                        arg = arg.help_heading(heading.clone());
                    }
                    cmd = cmd.arg(arg);
                }
            }
        }
    }
    Ok(cmd)
}

fn perr(program: &str, message: String) -> ParseError {
    ParseError {
        program: program.to_string(),
        message,
    }
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// Splits a help text into its parts (see the module docs for the accepted layout).
fn parse(text: &str) -> Result<Page, String> {
    let mut page = Page::default();
    let mut lines = text.lines().peekable();
    // About: paragraphs before "Usage:".
    let mut para = String::new();
    let usage_line = loop {
        let line = lines.next().ok_or("no `Usage:` line")?;
        if line.starts_with("Usage:") {
            break line;
        }
        if line.trim().is_empty() {
            if !para.is_empty() {
                page.about.push(std::mem::take(&mut para));
            }
        } else {
            if !para.is_empty() {
                para.push(' ');
            }
            para.push_str(line.trim());
        }
    };
    if !para.is_empty() {
        page.about.push(para);
    }
    // The usage may continue on indented lines (several usages); clap rebuilds it, but the
    // options it shows outside brackets are the required ones.
    let mut usage = usage_line.trim_start_matches("Usage:").to_string();
    while lines
        .peek()
        .is_some_and(|l| indent(l) > 0 && !l.trim().is_empty())
    {
        usage.push(' ');
        usage.push_str(lines.next().unwrap_or_default());
    }
    let mut depth = 0i32;
    for token in usage.split_whitespace() {
        if depth == 0 {
            if let Some(l) = token.strip_prefix("--") {
                page.required
                    .push(l.split('=').next().unwrap_or(l).to_string());
            }
        }
        depth +=
            token.matches(['[', '{']).count() as i32 - token.matches([']', '}']).count() as i32;
    }
    let mut current: Option<(String, Vec<Entry>)> = None;
    for line in lines {
        if line.trim().is_empty() {
            continue;
        }
        let ind = indent(line);
        if ind == 0 {
            if let Some(heading) = line.strip_suffix(':').filter(|h| !h.contains("  ")) {
                if let Some(done) = current.take() {
                    page.sections.push(done);
                }
                current = Some((heading.to_string(), Vec::new()));
                continue;
            }
            // Free text after the sections (after_help).
            if let Some(done) = current.take() {
                page.sections.push(done);
            }
            page.after.push(line.to_string());
            continue;
        }
        let Some((heading, entries)) = current.as_mut() else {
            if !page.after.is_empty() {
                page.after.push(line.to_string());
                continue;
            }
            return Err(format!("indented line outside any section: {line:?}"));
        };
        let body = line.trim_start();
        let is_entry = match heading.as_str() {
            "Commands" => ind == 2,
            "Arguments" => ind == 2 && (body.starts_with('<') || body.starts_with('[')),
            _ => (ind == 2 || ind == 6) && body.starts_with('-'),
        };
        if is_entry {
            let (spec, desc) = match body.find("  ") {
                Some(i) => (body[..i].to_string(), body[i..].trim().to_string()),
                None => (body.to_string(), String::new()),
            };
            entries.push(Entry {
                spec,
                desc: if desc.is_empty() { vec![] } else { vec![desc] },
            });
        } else {
            let last = entries
                .last_mut()
                .ok_or_else(|| format!("description before any entry: {line:?}"))?;
            last.desc.push(body.to_string());
        }
    }
    if let Some(done) = current.take() {
        page.sections.push(done);
    }
    Ok(page)
}

/// What clap appends to a description in brackets.
#[derive(Debug, Default)]
struct Extras {
    default: Option<String>,
    possible: Option<Vec<String>>,
    aliases: Option<Vec<String>>,
}

/// Separates `[default: ..]`, `[possible values: ..]`, `[aliases: ..]` and `[env: ..]` from
/// the description proper.
fn split_extras(desc: &[String]) -> (String, Extras) {
    let mut text = desc.join(" ");
    let mut extras = Extras::default();
    loop {
        let trimmed = text.trim_end();
        let Some(open) = trimmed
            .ends_with(']')
            .then(|| {
                trimmed
                    .rfind(" [")
                    .or_else(|| trimmed.starts_with('[').then_some(0))
            })
            .flatten()
        else {
            break;
        };
        let inner = trimmed[open..]
            .trim_start()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let Some((key, value)) = inner.split_once(": ") else {
            break;
        };
        let list = || value.split(", ").map(str::to_string).collect::<Vec<_>>();
        match key {
            "default" => extras.default = Some(value.to_string()),
            "possible values" => extras.possible = Some(list()),
            "aliases" | "alias" => extras.aliases = Some(list()),
            "env" | "short aliases" | "short alias" => {}
            _ => break,
        }
        text = trimmed[..open].to_string();
    }
    (text.trim().to_string(), extras)
}

fn split_spec_aliases(spec: &str) -> (String, Vec<String>) {
    // Commands: "name" or "name, alias".
    let mut parts = spec.split(", ").map(str::trim);
    let name = parts.next().unwrap_or_default().to_string();
    (name, parts.map(str::to_string).collect())
}

fn hint(value_name: &str) -> ValueHint {
    let v = value_name.to_ascii_uppercase();
    if v.ends_with("DIR") {
        ValueHint::DirPath
    } else if v.contains("FILE") || v.contains("PATH") || v.ends_with("CONFIG") {
        ValueHint::FilePath
    } else if v.ends_with("URI") || v.ends_with("URL") {
        ValueHint::Url
    } else {
        ValueHint::Unknown
    }
}

fn apply_extras(mut arg: Arg, extras: Extras) -> Arg {
    if let Some(d) = extras.default {
        arg = arg.default_value(d);
    }
    if let Some(values) = extras.possible {
        arg = arg.value_parser(
            values
                .into_iter()
                .map(PossibleValue::new)
                .collect::<Vec<_>>(),
        );
    }
    arg
}

/// `<NAME>`, `[NAME]`, `<NAME>...`, `[NAME]...`.
fn positional(e: &Entry) -> Result<Arg, String> {
    let spec = e.spec.trim();
    let (spec, many) = match spec.strip_suffix("...") {
        Some(s) => (s, true),
        None => (spec, false),
    };
    let (name, required) = if let Some(n) = spec.strip_prefix('<').and_then(|s| s.strip_suffix('>'))
    {
        (n, true)
    } else if let Some(n) = spec.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
        (n, false)
    } else {
        return Err(format!("unrecognised argument {spec:?}"));
    };
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(format!("unrecognised argument {spec:?}"));
    }
    let (desc, extras) = split_extras(&e.desc);
    let mut arg = Arg::new(name.to_ascii_lowercase())
        .value_name(name.to_string())
        .required(required)
        .help(desc)
        .value_hint(hint(name));
    if many {
        arg = arg
            .num_args(if required { 1.. } else { 0.. })
            .action(ArgAction::Append);
    }
    Ok(apply_extras(arg, extras))
}

/// `-s, --long <VALUE>`, `--long`, `-s`, `--long [<VALUE>]`, `--long <A> <B>`, `--long=<V>`,
/// `--long <V>...`.
fn option(e: &Entry) -> Result<Arg, String> {
    let bad = || format!("unrecognised option {:?}", e.spec);
    let mut short = None;
    let mut long = None;
    let mut values: Vec<String> = Vec::new();
    let mut optional_value = false;
    let mut many = false;
    let tokens = e
        .spec
        .split([' ', ','])
        .filter(|t| !t.is_empty())
        .flat_map(|t| {
            // `--long=<V>` (require_equals): the flag and its value.
            match t.strip_prefix("--").and_then(|l| l.split_once("=<")) {
                Some((l, v)) => vec![format!("--{l}"), format!("<{v}")],
                None => vec![t.to_string()],
            }
        });
    for token in tokens {
        let token = token.as_str();
        if let Some(l) = token.strip_prefix("--") {
            if long.is_some() || l.is_empty() {
                return Err(bad());
            }
            long = Some(l.to_string());
        } else if let Some(s) = token.strip_prefix('-') {
            let mut cs = s.chars();
            let (Some(c), None) = (cs.next(), cs.next()) else {
                return Err(bad());
            };
            short = Some(c);
        } else {
            let (t, m) = match token.strip_suffix("...") {
                Some(t) => (t, true),
                None => (token, false),
            };
            many |= m;
            let t = match t.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
                Some(inner) => {
                    optional_value = true;
                    inner
                }
                None => t,
            };
            let v = t
                .strip_prefix('<')
                .and_then(|t| t.strip_suffix('>'))
                .ok_or_else(bad)?;
            values.push(v.to_string());
        }
    }
    let id = long
        .clone()
        .or_else(|| short.map(String::from))
        .ok_or_else(bad)?;
    let (desc, extras) = split_extras(&e.desc);
    let mut arg = Arg::new(id).help(desc);
    if let Some(l) = &long {
        arg = arg.long(l.clone());
    }
    if let Some(s) = short {
        arg = arg.short(s);
    }
    if values.is_empty() {
        arg = arg.action(match long.as_deref() {
            Some("help") => ArgAction::Help,
            Some("version") => ArgAction::Version,
            _ if many => ArgAction::Count,
            _ => ArgAction::SetTrue,
        });
    } else {
        let n = values.len();
        arg = arg
            .value_names(values.clone())
            .value_hint(hint(&values[0]))
            .action(if many {
                ArgAction::Append
            } else {
                ArgAction::Set
            });
        arg = match (optional_value, many) {
            (true, _) => arg.num_args(0..=n),
            (false, true) => arg.num_args(n..),
            (false, false) => arg.num_args(n),
        };
    }
    Ok(apply_extras(arg, extras))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAME_LINE: &str = "Live-migrate a domain

Usage: vmbeam migrate [OPTIONS] <DOMAIN> <DESTURI> [MIGRATEURI]

Arguments:
  <DOMAIN>      Domain name
  [MIGRATEURI]  Migration data URI, e.g. tcp://198.18.0.12

Options:
  -c, --connect <CONNECT>  libvirt URI
                           second line
      --zero-copy          Require zero-copy
      --mode <MODE>        Mode [default: auto] [possible values: auto, zero-copy]
  -h, --help               Print help
";

    const NEXT_LINE: &str = "VMBeam's D-Bus service (system bus)

Usage: vmbeamd [OPTIONS]

Options:
      --config <CONFIG>
          The configuration [default: /etc/vmbeam/vmbeam.conf]

  -V, --version
          Print version
";

    #[test]
    fn same_line_layout() {
        let p = parse(SAME_LINE).unwrap();
        assert_eq!(p.about, ["Live-migrate a domain"]);
        assert_eq!(p.sections.len(), 2);
        let args = &p.sections[0].1;
        assert_eq!(args[1].spec, "[MIGRATEURI]");
        let opts = &p.sections[1].1;
        assert_eq!(opts[0].spec, "-c, --connect <CONNECT>");
        assert_eq!(opts[0].desc, ["libvirt URI", "second line"]);
        let a = option(&opts[2]).unwrap();
        assert_eq!(a.get_default_values(), ["auto"]);
        assert_eq!(a.get_possible_values().len(), 2);
        let p = positional(&args[1]).unwrap();
        assert!(!p.is_required_set());
    }

    #[test]
    fn next_line_layout() {
        let p = parse(NEXT_LINE).unwrap();
        let opts = &p.sections[0].1;
        assert_eq!(opts.len(), 2);
        let a = option(&opts[0]).unwrap();
        assert_eq!(a.get_long(), Some("config"));
        assert_eq!(a.get_default_values(), ["/etc/vmbeam/vmbeam.conf"]);
        assert_eq!(a.get_help().unwrap().to_string(), "The configuration");
    }

    #[test]
    fn value_names_with_equals_and_required_options() {
        let text = "Create\n\nUsage: x create [OPTIONS] --memory <MIB> <NAME>\n\nOptions:\n      --cloud-of <CVM=CLOUD>  Cloud\n      --memory <MIB>          Memory\n      --level=<N>             Level\n";
        let p = parse(text).unwrap();
        assert_eq!(p.required, ["memory"]);
        let a = option(&p.sections[0].1[0]).unwrap();
        assert_eq!(a.get_long(), Some("cloud-of"));
        assert_eq!(a.get_value_names().unwrap(), ["CVM=CLOUD"]);
        let a = option(&p.sections[0].1[2]).unwrap();
        assert_eq!(
            (a.get_long(), a.get_value_names().unwrap()),
            (Some("level"), &["N".into()][..])
        );
    }

    #[test]
    fn refuses_what_it_does_not_know() {
        let bad = "x\n\nUsage: x\n\nOptions:\n  --weird {X}  no\n";
        let p = parse(bad).unwrap();
        assert!(option(&p.sections[0].1[0]).is_err());
        assert!(parse("no usage line").is_err());
    }
}
