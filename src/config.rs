//! `--config FILE`: any flag of any subcommand from a TOML file.
//!
//! The file has one table per subcommand (`[node]`, `[coordinator]`, `[generate]`, `[demo]`, `[fetch]`) and top-level
//! keys for the global flags (`log_format`). Keys are long flag names, with dashes or underscores; values are strings,
//! integers, floats or booleans, and arrays stand for a repeated flag. The keys are checked against clap's own
//! description of the command line, so every flag is covered without a list kept by hand, and each value is checked
//! by the flag's own parser. The file's flags are spliced into the command line before clap parses it; a flag given
//! on the command line wins over the file.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::{Arg, ArgAction, Command};

/// Name of the global option that names the file.
const CONFIG_FLAG: &str = "config";

/// `args` (program name first) with the flags of the `--config` file inserted; unchanged without `--config`.
pub fn apply(cmd: &Command, args: Vec<OsString>) -> Result<Vec<OsString>> {
    let Some(path) = config_path(&args) else {
        return Ok(args);
    };
    let file = ConfigFile::load(cmd, &path)?;
    Ok(file.splice(cmd, args))
}

/// The value of `--config FILE` / `--config=FILE`, if given (before a `--`).
fn config_path(args: &[OsString]) -> Option<PathBuf> {
    let long = format!("--{CONFIG_FLAG}");
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--" {
            return None;
        }
        if s == long {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix(&format!("{long}=")) {
            return Some(PathBuf::from(v));
        }
    }
    None
}

/// One flag of the file: its arg id and the command-line tokens it stands for.
type Flag = (String, Vec<OsString>);

/// A checked config file: the command-line tokens each flag stands for.
#[derive(Debug, Default)]
pub struct ConfigFile {
    /// Global flags: (arg id, tokens).
    globals: Vec<Flag>,
    /// Per subcommand name: (arg id, tokens).
    tables: Vec<(String, Vec<Flag>)>,
}

impl ConfigFile {
    /// Reads and checks `path` against `cmd`: unknown tables or keys and values of the wrong type are errors that
    /// name the file and the key.
    pub fn load(cmd: &Command, path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        Self::parse(cmd, &text).with_context(|| format!("config file {}", path.display()))
    }

    fn parse(cmd: &Command, text: &str) -> Result<Self> {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| anyhow!("invalid TOML: {e}"))?;
        let mut out = ConfigFile::default();
        for (key, value) in &table {
            if let toml::Value::Table(t) = value {
                let sub = cmd.find_subcommand(key).ok_or_else(|| {
                    let names: Vec<String> = cmd.get_subcommands().map(|s| format!("[{}]", s.get_name())).collect();
                    anyhow!("unknown table [{key}]; the tables are {}", names.join(", "))
                })?;
                let mut flags = Vec::new();
                for (k, v) in t {
                    let arg = find_arg(sub, k).ok_or_else(|| {
                        anyhow!("unknown key `{k}` in [{key}]; the keys of [{key}] are {}", known_keys(sub))
                    })?;
                    let tokens = tokens(arg, v).with_context(|| format!("key `{k}` in [{key}]"))?;
                    flags.push((arg.get_id().to_string(), tokens));
                }
                out.tables.push((sub.get_name().to_string(), flags));
            } else {
                let arg = find_arg(cmd, key).filter(|a| a.get_id() != CONFIG_FLAG).ok_or_else(|| {
                    anyhow!(
                        "unknown top-level key `{key}`; top-level keys are the global flags ({}), \
                         the flags of a subcommand go in its table, e.g. [node]",
                        known_keys(cmd)
                    )
                })?;
                let tokens = tokens(arg, value).with_context(|| format!("key `{key}`"))?;
                out.globals.push((arg.get_id().to_string(), tokens));
            }
        }
        Ok(out)
    }

    /// The command line with the file's flags inserted: global flags after the program name, the flags of the
    /// invoked subcommand right after its name; flags already on the command line are left out.
    fn splice(&self, cmd: &Command, args: Vec<OsString>) -> Vec<OsString> {
        let sub_at = subcommand_position(cmd, &args);
        let sub = sub_at.and_then(|i| cmd.find_subcommand(args[i].to_string_lossy().as_ref()));
        let given = given_on_command_line(cmd, sub, &args);
        let keep = |flags: &[Flag]| -> Vec<OsString> {
            flags.iter().filter(|(id, _)| !given.contains(id)).flat_map(|(_, t)| t.iter().cloned()).collect()
        };
        let mut out = Vec::with_capacity(args.len() + 8);
        out.push(args[0].clone());
        out.extend(keep(&self.globals));
        match (sub_at, sub) {
            (Some(i), Some(sub)) => {
                out.extend(args[1..=i].iter().cloned());
                if let Some((_, flags)) = self.tables.iter().find(|(name, _)| name == sub.get_name()) {
                    out.extend(keep(flags));
                }
                out.extend(args[i + 1..].iter().cloned());
            }
            _ => out.extend(args[1..].iter().cloned()),
        }
        out
    }
}

/// Flags a config file may set: those with a long name that take a value or are switches (not help/version).
fn configurable(arg: &Arg) -> bool {
    arg.get_long().is_some()
        && matches!(
            arg.get_action(),
            ArgAction::Set | ArgAction::Append | ArgAction::SetTrue | ArgAction::SetFalse | ArgAction::Count
        )
}

fn find_arg<'c>(cmd: &'c Command, key: &str) -> Option<&'c Arg> {
    let name = key.replace('_', "-");
    cmd.get_arguments().filter(|a| configurable(a)).find(|a| a.get_long() == Some(name.as_str()))
}

fn known_keys(cmd: &Command) -> String {
    let keys: Vec<&str> = cmd
        .get_arguments()
        .filter(|a| configurable(a) && a.get_id() != CONFIG_FLAG)
        .filter_map(|a| a.get_long())
        .collect();
    if keys.is_empty() { "none".to_string() } else { keys.join(", ") }
}

fn type_name(v: &toml::Value) -> &'static str {
    v.type_str()
}

/// The command-line tokens for `arg = value`, the value checked by the flag's own parser.
fn tokens(arg: &Arg, value: &toml::Value) -> Result<Vec<OsString>> {
    let long = arg.get_long().unwrap_or_default();
    let flag = format!("--{long}");
    match arg.get_action() {
        ArgAction::SetTrue | ArgAction::SetFalse => {
            let toml::Value::Boolean(b) = value else {
                bail!("`--{long}` is a switch: expected true or false, found a {}", type_name(value));
            };
            let on = *b == matches!(arg.get_action(), ArgAction::SetTrue);
            Ok(if on { vec![flag.into()] } else { Vec::new() })
        }
        ArgAction::Count => match value {
            toml::Value::Integer(n) if *n >= 0 => Ok(vec![OsString::from(&flag); *n as usize]),
            _ => bail!("`--{long}` counts: expected an integer >= 0, found {value}"),
        },
        _ => {
            let many = matches!(arg.get_action(), ArgAction::Append) || arg.get_value_delimiter().is_some();
            let values: Vec<&toml::Value> = match value {
                toml::Value::Array(items) if many => items.iter().collect(),
                toml::Value::Array(_) => bail!("`--{long}` takes one value, found an array"),
                v => vec![v],
            };
            let mut out = Vec::with_capacity(values.len());
            for v in values {
                let text = scalar(v).with_context(|| format!("`--{long}`"))?;
                check_value(arg, &text).with_context(|| format!("`--{long}` = {v}"))?;
                out.push(OsString::from(format!("{flag}={text}")));
            }
            Ok(out)
        }
    }
}

fn scalar(v: &toml::Value) -> Result<String> {
    Ok(match v {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) => f.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => bail!("expected a string, number or boolean, found a {}", type_name(other)),
    })
}

/// Runs the flag's own value parser on `text` (a one-argument command with the same parser, action and delimiter),
/// so a bad value is reported against the file before the command line is parsed.
fn check_value(arg: &Arg, text: &str) -> Result<()> {
    let mut probe = Arg::new("value").action(arg.get_action().clone()).value_parser(arg.get_value_parser().clone());
    if let Some(d) = arg.get_value_delimiter() {
        probe = probe.value_delimiter(d);
    }
    let cmd = Command::new("config").no_binary_name(true).disable_help_flag(true).arg(probe);
    if let Err(e) = cmd.try_get_matches_from(["--", text]) {
        // clap's message is written for a terminal: keep its first line, without the `error: ` prefix.
        let rendered = e.to_string().replace(" for '<value>'", "");
        let first = rendered.lines().next().unwrap_or_default();
        bail!("{}", first.strip_prefix("error: ").unwrap_or(first));
    }
    Ok(())
}

/// Index of the subcommand's name in `args`, skipping global options and their values.
fn subcommand_position(cmd: &Command, args: &[OsString]) -> Option<usize> {
    let mut i = 1;
    while i < args.len() {
        let s = args[i].to_string_lossy();
        if s == "--" {
            return None;
        }
        if let Some(name) = s.strip_prefix("--") {
            if !name.contains('=') && takes_value(cmd.get_arguments().find(|a| a.get_long() == Some(name))) {
                i += 1;
            }
        } else if let Some(short) = s.strip_prefix('-').filter(|r| !r.is_empty()) {
            let c = short.chars().next();
            if short.len() == 1 && takes_value(cmd.get_arguments().find(|a| a.get_short() == c)) {
                i += 1;
            }
        } else if cmd.find_subcommand(s.as_ref()).is_some() {
            return Some(i);
        }
        i += 1;
    }
    None
}

fn takes_value(arg: Option<&Arg>) -> bool {
    arg.is_some_and(|a| matches!(a.get_action(), ArgAction::Set | ArgAction::Append))
}

/// Ids of the flags of `cmd` (globals) and `sub` that appear on the command line.
fn given_on_command_line(cmd: &Command, sub: Option<&Command>, args: &[OsString]) -> HashSet<String> {
    let all: Vec<&Arg> = cmd.get_arguments().chain(sub.into_iter().flat_map(|s| s.get_arguments())).collect();
    let mut given = HashSet::new();
    for a in args.iter().skip(1) {
        let s = a.to_string_lossy();
        if s == "--" {
            break;
        }
        let found = if let Some(name) = s.strip_prefix("--") {
            let name = name.split('=').next().unwrap_or_default();
            all.iter().find(|a| a.get_long() == Some(name))
        } else if let Some(short) = s.strip_prefix('-') {
            let c = short.chars().next();
            all.iter().find(|a| c.is_some() && a.get_short() == c)
        } else {
            None
        };
        if let Some(arg) = found {
            given.insert(arg.get_id().to_string());
        }
    }
    given
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::{Cli, Command as Sub};

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn parse_with(text: &str, args: &[&str]) -> Result<Cli> {
        let cmd = Cli::command();
        let file = ConfigFile::parse(&cmd, text)?;
        Ok(Cli::try_parse_from(file.splice(&cmd, os(args)))?)
    }

    fn err(text: &str) -> String {
        format!("{:#}", ConfigFile::parse(&Cli::command(), text).unwrap_err())
    }

    #[test]
    fn the_file_sets_flags_and_the_command_line_wins() {
        let text = r#"
            log_format = "json"
            [generate]
            prompt = "from the file"
            max_tokens = 7
            temperature = 0.5
            json = true
            stop = ["a", "b"]
            shards = ["0..2", "2..4"]
        "#;
        let cli = parse_with(text, &["shardline", "generate", "--max-tokens", "9"]).unwrap();
        assert_eq!(cli.log_format, crate::logging::LogFormat::Json);
        let Sub::Generate(g) = cli.command else { panic!("not generate") };
        assert_eq!(g.prompt.as_deref(), Some("from the file"));
        assert_eq!(g.max_tokens, 9);
        assert_eq!(g.temperature, 0.5);
        assert!(g.json);
        assert_eq!(g.stop, ["a", "b"]);
        assert_eq!(g.shards.len(), 2);

        let cli = parse_with(text, &["shardline", "--log-format", "text", "generate", "--prompt=cli"]).unwrap();
        assert_eq!(cli.log_format, crate::logging::LogFormat::Text);
        let Sub::Generate(g) = cli.command else { panic!("not generate") };
        assert_eq!(g.prompt.as_deref(), Some("cli"));
    }

    #[test]
    fn underscores_and_dashes_both_name_a_flag_and_other_tables_are_ignored() {
        let text =
            "[node]\nlayers = \"0..2\"\nkv_cache_mib = 64\n[coordinator]\np2p-listen = [\"/ip4/127.0.0.1/tcp/0\"]\n";
        let cli = parse_with(text, &["shardline", "node"]).unwrap();
        let Sub::Node(n) = cli.command else { panic!("not node") };
        assert_eq!(n.kv_cache_mib, 64);
        assert_eq!(n.layers.to_string(), "0..2");
    }

    #[test]
    fn mistakes_name_the_key() {
        assert!(err("[node]\nlayer = \"0..2\"").contains("unknown key `layer` in [node]"));
        assert!(err("[nodez]\nlayers = \"0..2\"").contains("unknown table [nodez]"));
        assert!(err("prompt = \"x\"").contains("unknown top-level key `prompt`"));
        assert!(err("config = \"x.toml\"").contains("unknown top-level key `config`"));
        let e = err("[generate]\nmax_tokens = \"lots\"");
        assert!(e.contains("max_tokens") && e.contains("lots"), "{e}");
        let e = err("[generate]\njson = \"yes\"");
        assert!(e.contains("`--json` is a switch"), "{e}");
        let e = err("[generate]\nprompt = [\"a\", \"b\"]");
        assert!(e.contains("takes one value"), "{e}");
        let e = err("[generate]\nprompt = { a = 1 }");
        assert!(e.contains("unknown table") || e.contains("expected a string"), "{e}");
        let e = err("[node]\nlayers = \"ten\"");
        assert!(e.contains("layers"), "{e}");
        assert!(err("[node\n").contains("invalid TOML"));
    }

    #[test]
    fn the_config_path_is_found_anywhere_before_a_double_dash() {
        assert_eq!(config_path(&os(&["s", "node", "--config", "a.toml"])), Some(PathBuf::from("a.toml")));
        assert_eq!(config_path(&os(&["s", "--config=b.toml", "node"])), Some(PathBuf::from("b.toml")));
        assert_eq!(config_path(&os(&["s", "node", "--", "--config", "a.toml"])), None);
    }

    #[test]
    fn the_subcommand_is_found_after_global_options() {
        let cmd = Cli::command();
        assert_eq!(subcommand_position(&cmd, &os(&["s", "--log-format", "json", "node"])), Some(3));
        assert_eq!(subcommand_position(&cmd, &os(&["s", "--config", "node", "generate"])), Some(3));
    }

    #[test]
    fn the_example_file_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/shardline.example.toml");
        let file = ConfigFile::load(&Cli::command(), &path).unwrap();
        let names: Vec<&str> = file.tables.iter().map(|(n, _)| n.as_str()).collect();
        for sub in ["node", "coordinator", "generate", "demo"] {
            assert!(names.contains(&sub), "the example has no [{sub}]");
        }
    }
}
