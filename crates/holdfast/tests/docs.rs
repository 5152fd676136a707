//! docs/cli.md and the binary's `--help` describe the same commands and flags: every
//! command and flag the reference names exists, and everything `--help` offers is in
//! the reference.

mod common;

use common::ok;
use std::collections::{BTreeMap, BTreeSet};

/// Options every admin command inherits, documented once under "Connecting the admin
/// commands", and clap's own.
const GLOBAL: &[&str] = &[
    "--server",
    "--token-file",
    "--ca-file",
    "--help",
    "--version",
];

/// What `holdfast PATH --help` lists: subcommands, and options as their names
/// (`["-d", "--datastore"]`).
fn help(path: &[String]) -> (Vec<String>, Vec<Vec<String>>) {
    let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
    args.push("--help");
    let text = ok(&args);
    let (mut subs, mut options) = (Vec::new(), Vec::new());
    let mut section = "";
    for line in text.lines() {
        if !line.starts_with(' ') && line.ends_with(':') {
            section = line;
            continue;
        }
        let t = line.trim_start();
        match section {
            "Commands:" if line.starts_with("  ") && !line.starts_with("   ") => {
                if let Some(name) = t.split_whitespace().next()
                    && name != "help"
                {
                    subs.push(name.to_string());
                }
            }
            "Options:" if t.starts_with('-') => {
                let spec = t.split("  ").next().unwrap_or(t);
                let names: Vec<String> = spec
                    .split([',', ' '])
                    .filter(|w| w.starts_with('-'))
                    .map(str::to_string)
                    .collect();
                options.push(names);
            }
            _ => {}
        }
    }
    (subs, options)
}

type Tree = BTreeMap<Vec<String>, Vec<Vec<String>>>;

/// Every command path under `path`, with its options.
fn help_tree(path: &mut Vec<String>, out: &mut Tree) {
    let (subs, options) = help(path);
    out.insert(path.clone(), options);
    for s in subs {
        path.push(s);
        help_tree(path, out);
        path.pop();
    }
}

/// Flags (`--long`, `-x`) named in `text`.
fn flags_in(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let b = text.as_bytes();
    for (i, _) in text.match_indices('-') {
        let boundary = i == 0 || matches!(b[i - 1], b' ' | b'`' | b'[' | b'(' | b'|');
        if !boundary {
            continue;
        }
        let rest = &text[i..];
        let len = rest
            .char_indices()
            .skip(1)
            .find(|&(j, c)| !(c.is_ascii_alphanumeric() || (c == '-' && j > 0)))
            .map_or(rest.len(), |(j, _)| j);
        let flag = &rest[..len];
        // `--keep-...` is a family of flags, not one.
        let long = flag.starts_with("--") && flag.len() > 3 && !flag.ends_with('-');
        let short = flag.len() == 2 && flag.as_bytes()[1].is_ascii_alphabetic();
        if long || short {
            out.insert(flag.to_string());
        }
    }
    out
}

/// One `###` (or `##`) section of docs/cli.md that documents commands.
struct Section {
    heading: String,
    commands: Vec<Vec<String>>,
    /// Flags in the heading and in option bullets (`- \`--flag ...\``): what the
    /// reference claims exists.
    claimed: BTreeSet<String>,
    /// Every flag the section's text mentions, plus its `##` chapter's introduction:
    /// what counts as documented.
    mentioned: BTreeSet<String>,
}

fn sections(doc: &str) -> Vec<Section> {
    let mut out: Vec<Section> = Vec::new();
    let mut intro = BTreeSet::new();
    let mut in_intro = false;
    for line in doc.lines() {
        if let Some(h) = line.strip_prefix("### ").or(line.strip_prefix("## ")) {
            if line.starts_with("## ") {
                intro.clear();
                in_intro = true;
            } else {
                in_intro = false;
            }
            let commands: Vec<Vec<String>> = h
                .split('`')
                .skip(1)
                .step_by(2)
                .filter_map(|span| span.strip_prefix("holdfast "))
                .map(|cmd| {
                    cmd.split_whitespace()
                        .take_while(|w| {
                            w.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                                && w.chars().all(|c| {
                                    c.is_ascii_lowercase() || c == '-' || c.is_ascii_digit()
                                })
                        })
                        .map(str::to_string)
                        .collect()
                })
                .collect();
            let head_flags = flags_in(h);
            out.push(Section {
                heading: h.to_string(),
                commands,
                claimed: head_flags.clone(),
                mentioned: head_flags
                    .into_iter()
                    .chain(intro.iter().cloned())
                    .collect(),
            });
            continue;
        }
        let found = flags_in(line);
        if in_intro {
            intro.extend(found.iter().cloned());
        }
        if let Some(s) = out.last_mut() {
            if line.trim_start().starts_with("- `-") {
                let spec = line.trim_start()[3..].split('`').next().unwrap_or("");
                s.claimed.extend(flags_in(spec));
            }
            s.mentioned.extend(found);
        }
    }
    out
}

#[test]
fn cli_md_and_help_agree() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/cli.md"))
        .expect("docs/cli.md");
    let mut tree = BTreeMap::new();
    help_tree(&mut Vec::new(), &mut tree);
    let secs = sections(&doc);
    let mut problems = Vec::new();

    // What the reference names must exist. A heading's lowercase words after
    // `holdfast` are the longest command path --help knows; a word left over is a
    // positional value (`recovery-points list`), unless the command has subcommands.
    let mut documented: BTreeMap<Vec<String>, BTreeSet<String>> = BTreeMap::new();
    let has_subs = |c: &Vec<String>| tree.keys().any(|k| k.len() > c.len() && k.starts_with(c));
    for s in &secs {
        let mut cmds = Vec::new();
        for words in &s.commands {
            let n = (0..=words.len())
                .rev()
                .find(|&n| tree.contains_key(&words[..n]))
                .unwrap_or(0);
            let cmd = words[..n].to_vec();
            if n == 0 || (n < words.len() && has_subs(&cmd)) {
                problems.push(format!(
                    "docs/cli.md \"{}\": no command `holdfast {}` in --help",
                    s.heading,
                    words.join(" ")
                ));
                continue;
            }
            cmds.push(cmd);
        }
        // A heading naming two commands claims the union of their flags.
        let known: BTreeSet<&String> = cmds
            .iter()
            .filter_map(|c| tree.get(c))
            .flatten()
            .flatten()
            .collect();
        for f in &s.claimed {
            if !GLOBAL.contains(&f.as_str()) && !known.contains(f) && !cmds.is_empty() {
                problems.push(format!("docs/cli.md \"{}\": --help has no {f}", s.heading));
            }
        }
        for cmd in cmds {
            documented
                .entry(cmd)
                .or_default()
                .extend(s.mentioned.iter().cloned());
        }
    }

    // What --help offers must be in the reference.
    for (cmd, options) in &tree {
        if cmd.is_empty() {
            continue;
        }
        let Some(doc_flags) = documented.get(cmd) else {
            if !has_subs(cmd) {
                problems.push(format!(
                    "`holdfast {}` is not in docs/cli.md",
                    cmd.join(" ")
                ));
            }
            continue;
        };
        for names in options {
            let global = names.iter().any(|n| GLOBAL.contains(&n.as_str()));
            if !global && !names.iter().any(|n| doc_flags.contains(n)) {
                problems.push(format!(
                    "`holdfast {} {}` is not in docs/cli.md",
                    cmd.join(" "),
                    names.join(", ")
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "docs/cli.md and --help disagree:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_flag_scanner_finds_long_and_short_flags_only() {
    let got = flags_in("`holdfast x -d DIR [--point ID|latest] --no-fsync` a-b -- x-y (--json)");
    let want: BTreeSet<String> = ["-d", "--point", "--no-fsync", "--json"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(got, want);
}
