//! containerd's configuration, edited the way each containerd version merges it.
//!
//! - containerd 1.6/1.7 (config `version = 2`): an imported file *replaces* whole plugin
//!   sections (services/server/config/config.go, mergeConfig), so a drop-in would wipe the
//!   CRI settings of config.toml. The runtime is therefore appended to config.toml itself,
//!   between marker lines, exactly as configs/README.md tells admins to do by hand.
//! - containerd 2.x (`version = 3` and later): imported files merge key by key. The runtime
//!   goes to `/etc/containerd/conf.d/cnfs.toml`; containerd >= 2.2's default config imports
//!   `/etc/containerd/conf.d/*.toml` already (then config.toml is not touched), otherwise its
//!   path is added to `imports` (kata-deploy does the same, runtime/containerd.rs).
//! - Anything else (no `version`, i.e. the 1.x schema before 1.5; not TOML; a `kata-cnfs`
//!   runtime the installer did not write) is left alone and the install fails saying why.

use anyhow::{bail, Context};

/// containerd's main configuration file.
pub const CONFIG: &str = "/etc/containerd/config.toml";
/// Where the 2.x drop-in goes.
pub const DROP_IN: &str = "/etc/containerd/conf.d/cnfs.toml";
/// The RuntimeClass handler (configs/kubernetes/runtimeclass.yaml).
pub const HANDLER: &str = "kata-cnfs";
const RUNTIME_TYPE: &str = "io.containerd.cnfs.v2";
const CRI_V2: &str = "io.containerd.grpc.v1.cri";
const CRI_V3: &str = "io.containerd.cri.v1.runtime";

pub const BEGIN: &str =
    "# BEGIN cnfs-deploy: the kata-cnfs runtime (`cnfs-deploy uninstall` removes this block)";
pub const END: &str = "# END cnfs-deploy";

#[derive(Debug, PartialEq, Eq)]
pub enum Schema {
    /// containerd 1.6 / 1.7.
    V2,
    /// containerd 2.x; whether `imports` already covers [`DROP_IN`].
    V3 { imports_drop_in: bool },
}

fn parse(path: &str, text: &str) -> anyhow::Result<toml::Table> {
    text.parse::<toml::Table>().map_err(|e| {
        anyhow::anyhow!(
            "{path} is not valid TOML ({}); cnfs-deploy leaves it alone",
            e.message()
        )
    })
}

/// Which form this config takes.
pub fn schema(path: &str, text: &str) -> anyhow::Result<Schema> {
    let t = parse(path, text)?;
    let version = match t.get("version") {
        None => bail!(
            "{path} has no `version` key: that is containerd's version 1 schema (before 1.5), \
             which cnfs-deploy does not edit; convert it with `containerd config migrate` \
             (containerd 2.x) or add `version = 2` after checking it (1.6/1.7)"
        ),
        Some(v) => v
            .as_integer()
            .with_context(|| format!("{path}: `version` must be an integer, is {v}"))?,
    };
    match version {
        2 => Ok(Schema::V2),
        v if v >= 3 => {
            let imports: Vec<String> = match t.get("imports") {
                None => Vec::new(),
                Some(toml::Value::Array(a)) => a
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).with_context(|| {
                            format!("{path}: `imports` must list strings, has {v}")
                        })
                    })
                    .collect::<anyhow::Result<_>>()?,
                Some(v) => bail!("{path}: `imports` must be an array of paths, is {v}"),
            };
            Ok(Schema::V3 {
                imports_drop_in: imports.iter().any(|i| import_covers(path, i, DROP_IN)),
            })
        }
        v => bail!("{path}: `version = {v}` is not a schema cnfs-deploy knows (2, or 3 and later)"),
    }
}

/// Whether one `imports` entry of the config file `config` (a path or glob; relative ones
/// are relative to the config file's directory, as containerd resolves them) includes `file`.
fn import_covers(config: &str, entry: &str, file: &str) -> bool {
    let full = if entry.starts_with('/') {
        entry.to_string()
    } else {
        let dir = config.rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dir}/{entry}")
    };
    // Go's filepath.Join cleans the joined path: `.` and `..` taken out lexically.
    let mut parts: Vec<&str> = Vec::new();
    for c in full.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    let full = format!("/{}", parts.join("/"));
    let opts = glob::MatchOptions {
        case_sensitive: true,
        require_literal_separator: true,
        require_literal_leading_dot: false,
    };
    glob::Pattern::new(&full).is_ok_and(|p| p.matches_with(file, opts))
}

/// The runtime table of a parsed config (or drop-in), if there is one.
fn runtime<'a>(t: &'a toml::Table, plugin: &str) -> Option<&'a toml::Table> {
    t.get("plugins")?
        .get(plugin)?
        .get("containerd")?
        .get("runtimes")?
        .get(HANDLER)?
        .as_table()
}

/// The shipped fragment (configs/containerd/...) with the installed shim and Kata
/// configuration filled in; checked by parsing it back.
pub fn fragment(
    template: &str,
    schema: &Schema,
    shim: &str,
    kata_config: &str,
) -> anyhow::Result<String> {
    let mut out = String::new();
    let mut in_tables = false;
    for line in template.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            in_tables = true;
        }
        // The file's own header explains how to install it by hand: not wanted in the node's
        // config. The `version` line stays (2.x drop-ins carry it).
        if !in_tables && t.starts_with('#') {
            continue;
        }
        let indent = &line[..line.len() - t.len()];
        if t.starts_with("# runtime_path =") || t.starts_with("runtime_path =") {
            out.push_str(&format!("{indent}runtime_path = {}\n", quote(shim)));
        } else if t.starts_with("ConfigPath =") {
            out.push_str(&format!("{indent}ConfigPath = {}\n", quote(kata_config)));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    let out = out.trim_start_matches('\n').to_string();
    let plugin = match schema {
        Schema::V2 => CRI_V2,
        Schema::V3 { .. } => CRI_V3,
    };
    let t = parse("the containerd fragment", &out)?;
    let rt = runtime(&t, plugin)
        .with_context(|| format!("the containerd fragment has no {plugin} runtime {HANDLER}"))?;
    let get = |k: &str| rt.get(k).and_then(|v| v.as_str());
    let config = rt
        .get("options")
        .and_then(|o| o.get("ConfigPath"))
        .and_then(|v| v.as_str());
    if get("runtime_type") != Some(RUNTIME_TYPE)
        || get("runtime_path") != Some(shim)
        || config != Some(kata_config)
    {
        bail!("the containerd fragment does not set runtime_type, runtime_path and ConfigPath as expected");
    }
    Ok(out)
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Where the installer's block is in `text`: from the start of a line that is exactly
/// [`BEGIN`] to the end of the next line that is exactly [`END`] (either may end in CRLF).
/// Whole lines only: an admin's comment that quotes a marker is not the block.
fn block_range(text: &str) -> Option<(usize, usize)> {
    let mut start = None;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let bare = line.trim_end_matches('\n').trim_end_matches('\r');
        match start {
            None if bare == BEGIN => start = Some(pos),
            Some(s) if bare == END => return Some((s, pos + line.len())),
            _ => {}
        }
        pos += line.len();
    }
    None
}

/// `text` with the installer's block taken out (and the blank line put before it).
pub fn without_block(text: &str) -> String {
    let Some((start, end)) = block_range(text) else {
        return text.to_string();
    };
    let mut head = &text[..start];
    // The blank line with_block put before it (CRLF if an editor converted the file).
    if head.ends_with("\r\n\r\n") {
        head = &head[..head.len() - 2];
    } else if head.ends_with("\n\n") {
        head = &head[..head.len() - 1];
    }
    format!("{head}{}", &text[end..])
}

/// config.toml (version 2) with the runtime block appended, or replaced where it is.
pub fn with_block(path: &str, text: &str, fragment: &str) -> anyhow::Result<String> {
    let base = without_block(text);
    if runtime(&parse(path, &base)?, CRI_V2).is_some() {
        bail!(
            "{path} already defines the runtime {HANDLER} outside cnfs-deploy's block (a manual \
             install?); remove that table, then run cnfs-deploy again"
        );
    }
    let block = format!("{BEGIN}\n{}\n{END}\n", fragment.trim_end());
    let out = match block_range(text) {
        Some((s, e)) => format!("{}{block}{}", &text[..s], &text[e..]),
        None => {
            let mut out = base;
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push('\n');
            out.push_str(&block);
            out
        }
    };
    let t = parse(path, &out).with_context(|| format!("{path} with the runtime appended"))?;
    let rt =
        runtime(&t, CRI_V2).context("the appended runtime is not where containerd reads it")?;
    if rt.get("runtime_type").and_then(|v| v.as_str()) != Some(RUNTIME_TYPE) {
        bail!("{path}: the appended runtime has the wrong runtime_type");
    }
    Ok(out)
}

/// config.toml (version >= 3) with [`DROP_IN`] added to `imports` (formatting kept).
pub fn with_import(path: &str, text: &str) -> anyhow::Result<String> {
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e| {
        anyhow::anyhow!("{path} is not valid TOML ({e}); cnfs-deploy leaves it alone")
    })?;
    if doc.get("imports").is_none() {
        // Root keys must come before the first table: a new key is placed there by toml_edit.
        doc.insert("imports", toml_edit::value(toml_edit::Array::new()));
    }
    let imports = doc
        .get_mut("imports")
        .and_then(|i| i.as_array_mut())
        .with_context(|| format!("{path}: `imports` must be an array of paths"))?;
    if !imports.iter().any(|v| v.as_str() == Some(DROP_IN)) {
        imports.push(DROP_IN);
    }
    Ok(doc.to_string())
}

/// config.toml with the installer's `imports` entry taken out (when it changed since).
pub fn without_import(path: &str, text: &str) -> anyhow::Result<String> {
    let mut doc: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| anyhow::anyhow!("{path} is not valid TOML ({e})"))?;
    let Some(imports) = doc.get_mut("imports").and_then(|i| i.as_array_mut()) else {
        return Ok(text.to_string());
    };
    if !imports.iter().any(|v| v.as_str() == Some(DROP_IN)) {
        // Written back, the document would lose CRLF line ends: nothing to take out.
        return Ok(text.to_string());
    }
    imports.retain(|v| v.as_str() != Some(DROP_IN));
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const V2_TEMPLATE: &str =
        include_str!("../../configs/containerd/config.toml.d/cnfs-runtime.toml");
    const V3_TEMPLATE: &str =
        include_str!("../../configs/containerd/config-v3.toml.d/cnfs-runtime.toml");
    const SHIM: &str = "/opt/cnfs/bin/containerd-shim-cnfs-v2";
    const KATA: &str = "/opt/cnfs/share/defaults/kata-containers/configuration-cnfs.toml";

    const SITE_V2: &str = r#"version = 2
root = "/var/lib/containerd"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#;

    #[test]
    fn the_schema_decides_the_form_and_unknown_configs_are_refused_by_name() {
        assert_eq!(schema(CONFIG, SITE_V2).expect("v2"), Schema::V2);
        assert_eq!(
            schema(
                CONFIG,
                "version = 3\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n"
            )
            .expect("v3"),
            Schema::V3 {
                imports_drop_in: true
            }
        );
        assert_eq!(
            schema(CONFIG, "version = 3\nimports = [\"conf.d/*.toml\"]\n").expect("relative"),
            Schema::V3 {
                imports_drop_in: true
            }
        );
        assert_eq!(
            schema(
                CONFIG,
                "version = 3\nimports = [\"/etc/containerd/conf.d/*/x.toml\"]\n"
            )
            .expect("other glob"),
            Schema::V3 {
                imports_drop_in: false
            }
        );
        assert_eq!(
            schema(CONFIG, "version = 3\n").expect("no imports"),
            Schema::V3 {
                imports_drop_in: false
            }
        );
        let e = schema(CONFIG, "[plugins.cri]\nx = 1\n").expect_err("v1");
        assert!(e.to_string().contains("no `version` key"), "{e}");
        let e = schema(CONFIG, "version = 1\n").expect_err("v1 explicit");
        assert!(e.to_string().contains("`version = 1`"), "{e}");
        let e = schema(CONFIG, "version = 2\n[plugins\n").expect_err("garbage");
        assert!(
            e.to_string().contains("not valid TOML") && e.to_string().contains(CONFIG),
            "{e}"
        );
        let e = schema(CONFIG, "version = \"2\"\n").expect_err("string");
        assert!(e.to_string().contains("must be an integer"), "{e}");
    }

    #[test]
    fn the_v2_block_is_appended_once_and_taken_out_to_the_same_bytes() {
        let frag = fragment(V2_TEMPLATE, &Schema::V2, SHIM, KATA).expect("fragment");
        assert!(!frag.contains("APPEND this file"), "{frag}");
        let once = with_block(CONFIG, SITE_V2, &frag).expect("append");
        assert!(once.starts_with(SITE_V2), "site config kept as it was");
        let twice = with_block(CONFIG, &once, &frag).expect("again");
        assert_eq!(once, twice, "a second install changes nothing");
        assert_eq!(without_block(&once), SITE_V2);
        let t: toml::Table = once.parse().expect("toml");
        let rt = runtime(&t, CRI_V2).expect("runtime");
        assert_eq!(rt["runtime_path"].as_str(), Some(SHIM));
        assert!(
            runtime(&t, CRI_V2).is_some()
                && t["plugins"][CRI_V2]["containerd"]["runtimes"]
                    .get("runc")
                    .is_some()
        );
    }

    #[test]
    fn an_updated_block_replaces_the_old_one_in_place() {
        let frag = fragment(V2_TEMPLATE, &Schema::V2, SHIM, KATA).expect("fragment");
        let mut text = with_block(CONFIG, SITE_V2, &frag).expect("append");
        text.push_str("\n# the admin's later line\n");
        let newer = fragment(V2_TEMPLATE, &Schema::V2, "/opt/cnfs/bin/other", KATA).expect("new");
        let out = with_block(CONFIG, &text, &newer).expect("replace");
        assert!(
            out.contains("/opt/cnfs/bin/other") && !out.contains(SHIM),
            "{out}"
        );
        assert!(out.ends_with("# the admin's later line\n"), "{out}");
        assert_eq!(out.matches(BEGIN).count(), 1);
    }

    #[test]
    fn a_runtime_written_by_hand_is_not_overwritten() {
        let frag = fragment(V2_TEMPLATE, &Schema::V2, SHIM, KATA).expect("fragment");
        let manual = format!("{SITE_V2}\n{V2_TEMPLATE}");
        let e = with_block(CONFIG, &manual, &frag).expect_err("manual");
        assert!(e.to_string().contains("outside cnfs-deploy's block"), "{e}");
    }

    #[test]
    fn a_block_an_editor_turned_crlf_is_taken_out_whole() {
        let frag = fragment(V2_TEMPLATE, &Schema::V2, SHIM, KATA).expect("fragment");
        let crlf = with_block(CONFIG, SITE_V2, &frag)
            .expect("append")
            .replace('\n', "\r\n");
        assert_eq!(without_block(&crlf), SITE_V2.replace('\n', "\r\n"));
        let again = with_block(CONFIG, &crlf, &frag).expect("again");
        assert_eq!(again.matches(BEGIN).count(), 1, "{again}");
    }

    #[test]
    fn a_marker_quoted_inside_a_line_is_not_the_block() {
        let site = format!("# the installer writes after {BEGIN}\n{SITE_V2}# and ends at {END}\n");
        assert_eq!(without_block(&site), site);
        let frag = fragment(V2_TEMPLATE, &Schema::V2, SHIM, KATA).expect("fragment");
        let once = with_block(CONFIG, &site, &frag).expect("append");
        assert!(once.starts_with(&site), "{once}");
        assert_eq!(with_block(CONFIG, &once, &frag).expect("again"), once);
        assert_eq!(without_block(&once), site);
    }

    #[test]
    fn taking_out_an_import_that_is_not_there_changes_no_byte() {
        // toml_edit writes a document back with LF line ends: only rewrite when needed.
        let crlf = SITE_V2.replace('\n', "\r\n");
        assert_eq!(without_import(CONFIG, &crlf).expect("v2"), crlf);
        let v3 = "version = 3\r\nimports = [\"/etc/other.toml\"]\r\n";
        assert_eq!(without_import(CONFIG, v3).expect("v3"), v3);
    }

    #[test]
    fn a_relative_import_is_relative_to_the_config_files_own_directory() {
        // containerd joins it with the directory of the config it was given (--config).
        let k3s = "/var/lib/rancher/k3s/agent/etc/containerd/config.toml";
        assert_eq!(
            schema(k3s, "version = 3\nimports = [\"conf.d/*.toml\"]\n").expect("schema"),
            Schema::V3 {
                imports_drop_in: false
            }
        );
        assert_eq!(
            schema(
                k3s,
                "version = 3\nimports = [\"../../../../../../../etc/containerd/./conf.d/*.toml\"]\n"
            )
            .expect("schema"),
            Schema::V3 {
                imports_drop_in: true
            },
            "cleaned as Go's filepath.Join cleans it"
        );
    }

    #[test]
    fn the_v3_drop_in_and_import_round_trip() {
        let frag = fragment(
            V3_TEMPLATE,
            &Schema::V3 {
                imports_drop_in: false,
            },
            SHIM,
            KATA,
        )
        .expect("v3 fragment");
        assert!(frag.starts_with("version = 3"), "{frag}");
        let site = "version = 3\nroot = \"/var/lib/containerd\"\n\n[plugins.\"io.containerd.cri.v1.runtime\"]\n  enable_selinux = false\n";
        let with = with_import(CONFIG, site).expect("import");
        assert_eq!(
            schema(CONFIG, &with).expect("schema"),
            Schema::V3 {
                imports_drop_in: true
            }
        );
        assert_eq!(with_import(CONFIG, &with).expect("again"), with);
        let t: toml::Table = with.parse().expect("toml");
        assert_eq!(t["root"].as_str(), Some("/var/lib/containerd"));
        assert!(without_import(CONFIG, &with)
            .expect("out")
            .contains("imports = []"));
        let listed = "version = 3\nimports = [\"/etc/other.toml\"]\n";
        let with = with_import(CONFIG, listed).expect("append");
        assert!(
            with.contains("\"/etc/other.toml\"") && with.contains(DROP_IN),
            "{with}"
        );
        assert_eq!(
            without_import(CONFIG, &with).expect("out"),
            "version = 3\nimports = [\"/etc/other.toml\"]\n"
        );
    }
}
