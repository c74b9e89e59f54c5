//! Where limits are read from: one file, or a directory of files (envoyproxy/ratelimit's
//! `RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/config` layout). Each file is one YAML document, in
//! either format: a list is Limitador's, a mapping with `domain` is envoyproxy/ratelimit's.
//! A namespace (domain) takes its limits from one file: two files that define it are an
//! error naming both (unless `MERGE_DOMAIN_CONFIG` merges envoyproxy/ratelimit domains).

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use super::file::{LimitsError, digest, parse_limits};
use super::ratelimit::{is_ratelimit_document, read_document};
use super::{Domain, LimitSet, RatelimitSettings};

/// The content of a limits path, as read at one moment.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    /// Whether `path` is a directory.
    pub directory: bool,
    /// Each file and its bytes, sorted by path (one entry for a file path).
    pub files: Vec<(PathBuf, Vec<u8>)>,
}

/// Most files read from a directory (a mistaken path, such as `/`, is refused, not walked).
const MAX_FILES: usize = 10_000;

impl Source {
    /// A fingerprint of the content, to tell versions apart.
    pub fn digest(&self) -> u64 {
        if !self.directory {
            return self.files.first().map_or(0, |(_, bytes)| digest(bytes));
        }
        let mut hasher = DefaultHasher::new();
        for (path, bytes) in &self.files {
            path.hash(&mut hasher);
            bytes.hash(&mut hasher);
        }
        hasher.finish()
    }

    /// Whether there is nothing in it: an empty file, or a directory without a non-empty
    /// file (a write or a swap in progress, more likely than an intent).
    pub fn is_empty(&self) -> bool {
        self.files
            .iter()
            .all(|(_, bytes)| std::str::from_utf8(bytes).is_ok_and(|text| text.trim().is_empty()))
    }
}

fn error(path: &Path, problem: String) -> LimitsError {
    LimitsError {
        file: path.display().to_string(),
        problems: vec![problem],
    }
}

/// Reads a limits file, or every file under a directory (recursively, following symlinks,
/// skipping names that start with `.`, as Kubernetes ConfigMap mounts need).
pub fn read_source(path: &Path) -> Result<Source, LimitsError> {
    let metadata =
        std::fs::metadata(path).map_err(|e| error(path, format!("cannot read it: {e}")))?;
    if !metadata.is_dir() {
        let bytes = std::fs::read(path).map_err(|e| error(path, format!("cannot read it: {e}")))?;
        return Ok(Source {
            path: path.to_path_buf(),
            directory: false,
            files: vec![(path.to_path_buf(), bytes)],
        });
    }
    let mut files = Vec::new();
    let mut pending = vec![path.to_path_buf()];
    while let Some(directory) = pending.pop() {
        let entries = std::fs::read_dir(&directory)
            .map_err(|e| error(&directory, format!("cannot list it: {e}")))?;
        for entry in entries {
            let entry = entry.map_err(|e| error(&directory, format!("cannot list it: {e}")))?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let file = entry.path();
            let Ok(metadata) = std::fs::metadata(&file) else {
                continue; // a dangling symlink, or removed meanwhile
            };
            if metadata.is_dir() {
                pending.push(file);
            } else if metadata.is_file() {
                let bytes = std::fs::read(&file)
                    .map_err(|e| error(&file, format!("cannot read it: {e}")))?;
                files.push((file, bytes));
                if files.len() > MAX_FILES {
                    return Err(error(
                        path,
                        format!("more than {MAX_FILES} files under it; is it the right path?"),
                    ));
                }
            }
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Source {
        path: path.to_path_buf(),
        directory: true,
        files,
    })
}

/// Reads and loads a limits path (file or directory).
pub fn load_path(path: &Path, settings: RatelimitSettings) -> Result<LimitSet, LimitsError> {
    load_source(&read_source(path)?, settings)
}

/// The limits of `source`, every problem of every file reported at once.
pub fn load_source(source: &Source, settings: RatelimitSettings) -> Result<LimitSet, LimitsError> {
    let mut problems = Vec::new();
    let mut limits = Vec::new();
    let mut domains: Vec<Domain> = Vec::new();
    // Which file each namespace of the Limitador format comes from.
    let mut owners: HashMap<String, String> = HashMap::new();
    for (path, bytes) in &source.files {
        let file = path.display().to_string();
        // In a directory, each problem says which file it is in.
        let mut report = |found: Vec<String>| {
            for problem in found {
                problems.push(if source.directory {
                    format!("{file}: {problem}")
                } else {
                    problem
                });
            }
        };
        let Ok(text) = std::str::from_utf8(bytes) else {
            report(vec!["not UTF-8".to_string()]);
            continue;
        };
        let document: serde_yaml::Value = match serde_yaml::from_str(text) {
            Ok(document) => document,
            Err(e) => {
                report(vec![format!("not valid YAML: {e}")]);
                continue;
            }
        };
        if is_ratelimit_document(&document) {
            report(read_document(&file, document, settings, &mut domains));
            continue;
        }
        match parse_limits(&file, text) {
            Ok(parsed) => {
                let mut found = Vec::new();
                for limit in &parsed {
                    let owner = owners
                        .entry(limit.namespace.clone())
                        .or_insert_with(|| file.clone());
                    if *owner != file {
                        found.push(format!(
                            "namespace {:?} is also defined in {owner}; each namespace comes from one file",
                            limit.namespace
                        ));
                    }
                }
                found.dedup();
                report(found);
                limits.extend(parsed);
            }
            Err(e) => report(e.problems),
        }
    }
    for domain in &domains {
        if let Some(owner) = owners.get(&domain.name) {
            problems.push(format!(
                "domain {:?} is defined in both {} (envoyproxy/ratelimit format) and {owner} \
                 (Limitador format); each namespace comes from one file",
                domain.name,
                domain.files.join(", ")
            ));
        }
    }
    if !problems.is_empty() {
        return Err(LimitsError {
            file: source.path.display().to_string(),
            problems,
        });
    }
    Ok(LimitSet::new(limits)
        .with_domains(domains, settings)
        .from_content(source.digest()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(files: &[(&str, &str)]) -> Source {
        Source {
            path: PathBuf::from("dir"),
            directory: true,
            files: files
                .iter()
                .map(|(name, text)| (PathBuf::from(name), text.as_bytes().to_vec()))
                .collect(),
        }
    }

    #[test]
    fn both_formats_load_side_by_side() {
        let set = load_source(
            &source(&[
                ("dir/a.yaml", "- {namespace: lim, max_value: 1, seconds: 1}"),
                (
                    "dir/b.yaml",
                    "domain: env\ndescriptors:\n  - {key: k, rate_limit: {unit: minute, requests_per_unit: 3}}",
                ),
            ]),
            RatelimitSettings::default(),
        )
        .unwrap();
        assert_eq!(set.len(), 2);
        assert!(set.namespace_entry("env").unwrap().tree().is_some());
        assert!(set.namespace_entry("lim").unwrap().tree().is_none());
    }

    #[test]
    fn a_domain_from_two_files_names_both() {
        let env = "domain: d\ndescriptors:\n  - {key: k, rate_limit: {unit: minute, requests_per_unit: 3}}";
        let e = load_source(
            &source(&[
                ("dir/a.yaml", env),
                ("dir/b.yaml", "- {namespace: d, max_value: 1, seconds: 1}"),
            ]),
            RatelimitSettings::default(),
        )
        .err()
        .unwrap();
        let text = e.to_string();
        assert!(
            text.contains("dir/a.yaml") && text.contains("dir/b.yaml"),
            "{text}"
        );
        let e = load_source(
            &source(&[("dir/a.yaml", env), ("dir/c.yaml", env)]),
            RatelimitSettings::default(),
        )
        .err()
        .unwrap();
        let text = e.to_string();
        assert!(
            text.contains("dir/a.yaml") && text.contains("dir/c.yaml"),
            "{text}"
        );
        // Merged when asked.
        let merge = RatelimitSettings {
            merge_domains: true,
            ..RatelimitSettings::default()
        };
        let other = "domain: d\ndescriptors:\n  - {key: j, rate_limit: {unit: minute, requests_per_unit: 3}}";
        let set = load_source(
            &source(&[("dir/a.yaml", env), ("dir/c.yaml", other)]),
            merge,
        )
        .unwrap();
        assert_eq!(set.namespace("d").len(), 2);
    }
}
