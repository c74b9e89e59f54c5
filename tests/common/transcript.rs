//! A documentation section's "real output" blocks, run as a transcript: each ```sh block that
//! runs a command of the kind the test runs is a step, and the fenced block right
//! after it is what the step prints (another fenced block with no command between them runs
//! the same command again). A test runs the steps in order against a fresh server and compares;
//! with `UPDATE_DOCS=1` it writes what the commands printed into the file instead, so the
//! blocks are produced by the same code that checks them.

use std::ops::Range;
use std::path::PathBuf;

use regex::Regex;

use super::process::manifest_dir;

/// One command and the output the document shows for it.
pub struct Step {
    pub command: String,
    pub shown: String,
    /// Where `shown` sits in the file (replaced under `UPDATE_DOCS=1`).
    range: Range<usize>,
}

pub struct Transcript {
    path: PathBuf,
    text: String,
    pub steps: Vec<Step>,
}

impl Transcript {
    /// The steps of the section under `heading` (up to the next heading of its level) in
    /// `file` (relative to the repository), whose command contains `command_prefix`.
    pub fn read(file: &str, heading: &str, command_prefix: &str) -> Transcript {
        let path = manifest_dir().join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let level = heading.chars().take_while(|c| *c == '#').count();
        let start = text
            .find(&format!("\n{heading}\n"))
            .unwrap_or_else(|| panic!("{file} has no section {heading:?}"))
            + 1;
        let next = format!("\n{} ", "#".repeat(level));
        let end = text[start + heading.len()..]
            .find(&next)
            .map_or(text.len(), |at| start + heading.len() + at);
        let mut steps: Vec<Step> = Vec::new();
        let mut command: Option<String> = None;
        for (info, body) in fenced_blocks(&text, start..end) {
            let shown = text[body.clone()].trim_end_matches('\n').to_string();
            if info == "sh" {
                command = shown.contains(command_prefix).then_some(shown);
            } else if let Some(command) = &command {
                steps.push(Step {
                    command: command.clone(),
                    shown,
                    range: body,
                });
            }
        }
        assert!(!steps.is_empty(), "{file} {heading:?} shows no command");
        Transcript { path, text, steps }
    }

    /// Runs every step with `run` and compares with `same`; under `UPDATE_DOCS=1` writes what
    /// the commands printed into the file instead.
    pub fn check(self, mut run: impl FnMut(&str) -> String, same: impl Fn(&str, &str) -> bool) {
        let update = std::env::var("UPDATE_DOCS").is_ok_and(|v| v == "1");
        let mut printed_all = Vec::new();
        for step in &self.steps {
            let printed = run(&step.command);
            let printed = printed.trim_end_matches('\n').to_string();
            assert!(
                update || same(&step.shown, &printed),
                "{}: the output shown for\n{}\nis\n{}\nbut it printed\n{}\n(UPDATE_DOCS=1 rewrites the file)",
                self.path.display(),
                step.command,
                step.shown,
                printed
            );
            printed_all.push((step.range.clone(), printed));
        }
        if update {
            let mut text = self.text;
            // From the end, so the earlier ranges stay valid.
            for (range, printed) in printed_all.into_iter().rev() {
                text.replace_range(range, &format!("{printed}\n"));
            }
            std::fs::write(&self.path, text).unwrap();
            eprintln!("UPDATE_DOCS=1: rewrote {}", self.path.display());
        }
    }
}

/// The fenced blocks within `within`: (info string, range of the body including its last
/// newline).
fn fenced_blocks(text: &str, within: Range<usize>) -> Vec<(String, Range<usize>)> {
    let mut blocks = Vec::new();
    let mut at = within.start;
    let mut open: Option<(String, usize)> = None;
    for line in text[within.clone()].split_inclusive('\n') {
        let bare = line.trim_end_matches('\n');
        match &open {
            None => {
                if let Some(info) = bare.strip_prefix("```") {
                    open = Some((info.to_string(), at + line.len()));
                }
            }
            Some((info, body)) => {
                if bare == "```" {
                    blocks.push((info.clone(), *body..at));
                    open = None;
                }
            }
        }
        at += line.len();
    }
    blocks
}

/// Whether `printed` is what `shown` shows, where the numbers matched by `moving` (one
/// capture group each) may differ by at most `tolerance` and the text matched by `masked` is
/// not compared (timestamps).
pub fn same_within(
    shown: &str,
    printed: &str,
    moving: &[&str],
    tolerance: f64,
    masked: &[&str],
) -> bool {
    let normalise = |text: &str| {
        let mut text = text.to_string();
        let mut numbers = Vec::new();
        for pattern in moving {
            let re = Regex::new(pattern).unwrap();
            let mut out = String::new();
            let mut last = 0;
            for caps in re.captures_iter(&text) {
                let number = caps.get(1).unwrap();
                numbers.push(number.as_str().parse::<f64>().unwrap_or(f64::NAN));
                out.push_str(&text[last..number.start()]);
                out.push('#');
                last = number.end();
            }
            out.push_str(&text[last..]);
            text = out;
        }
        for pattern in masked {
            text = Regex::new(pattern)
                .unwrap()
                .replace_all(&text, "<masked>")
                .into_owned();
        }
        (text, numbers)
    };
    let (shown_text, shown_numbers) = normalise(shown);
    let (printed_text, printed_numbers) = normalise(printed);
    shown_text == printed_text
        && shown_numbers.len() == printed_numbers.len()
        && shown_numbers
            .iter()
            .zip(&printed_numbers)
            .all(|(a, b)| (a - b).abs() <= tolerance)
}
