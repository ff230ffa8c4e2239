//! The CSI spec's size limits ("Size Limits": a string at most 128 bytes, a
//! `map<string, string>` at most 4 KiB, `mount_flags` at most 4 KiB in all, `node_id` at most
//! 256 bytes; paths "SHOULD support the maximum path length allowed by the operating
//! system"), applied to every field cnfs-csi reads, and the bounded form in which caller text
//! is shown back.

use std::borrow::Cow;
use std::collections::HashMap;

use tonic::Status;

use crate::capability::invalid;

pub use cnfs_protocols::volume_url::{echo, ECHO_MAX};

/// A CSI string field (`volume_id`, `name`, `fs_type`, one mount flag, ...).
pub const MAX_STRING: usize = 128;
/// A CSI map (`volume_context`, `parameters`, `secrets`): keys and values together.
pub const MAX_MAP: usize = 4096;
/// `mount_flags`: all flags together.
pub const MAX_FLAGS: usize = 4096;
/// `node_id` (the spec's own override of the string limit).
pub const MAX_NODE_ID: usize = 256;
/// A path CSI hands over (`target_path`, `volume_path`): Linux's `PATH_MAX` counts the
/// terminating NUL, so the kernel takes at most 4095 bytes.
pub const MAX_PATH: usize = 4095;
/// One component of such a path: Linux's `NAME_MAX`.
pub const MAX_PATH_COMPONENT: usize = 255;

/// A string field: at most [`MAX_STRING`] bytes and, since it is written into records, files
/// and logs, no control characters.
pub fn string(field: &str, value: &str) -> Result<(), Status> {
    if value.len() > MAX_STRING {
        return Err(too_long(field, value.len(), MAX_STRING));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

/// A required [`string`].
pub fn required_string(field: &str, value: &str) -> Result<(), Status> {
    crate::capability::required(field, value)?;
    string(field, value)
}

/// A map: keys and values together at most [`MAX_MAP`] bytes.
pub fn map(field: &str, map: &HashMap<String, String>) -> Result<(), Status> {
    let size = map.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
    if size > MAX_MAP {
        return Err(too_long(field, size, MAX_MAP));
    }
    Ok(())
}

/// Mount flags: each one a [`string`], all together at most [`MAX_FLAGS`] bytes.
pub fn flags(field: &str, flags: &[String]) -> Result<(), Status> {
    let size = flags.iter().map(String::len).sum::<usize>();
    if size > MAX_FLAGS {
        return Err(too_long(field, size, MAX_FLAGS));
    }
    for (i, f) in flags.iter().enumerate() {
        string(&format!("{field}[{i}]"), f)?;
    }
    Ok(())
}

/// A path CSI hands over: required, absolute, no `..` component, no control characters,
/// within Linux's `PATH_MAX` and `NAME_MAX`; kept exactly as given (the record's key).
pub fn path(field: &str, path: &str) -> Result<String, Status> {
    crate::capability::required(field, path)?;
    if path.len() > MAX_PATH {
        return Err(too_long(field, path.len(), MAX_PATH));
    }
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(invalid(field, "must be an absolute path without \"..\""));
    }
    if path.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    if let Some(c) = path.split('/').find(|c| c.len() > MAX_PATH_COMPONENT) {
        return Err(invalid(
            field,
            format!(
                "has a component of {} bytes, longer than {MAX_PATH_COMPONENT} bytes",
                c.len()
            ),
        ));
    }
    Ok(path.to_string())
}

/// A value for a log field: as given when it is short, else in [`echo`]'s bounded form.
/// (The JSON log escapes control characters itself.)
pub fn log_value(text: &str) -> Cow<'_, str> {
    if text.len() <= ECHO_MAX {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(echo(text))
    }
}

fn too_long(field: &str, len: usize, max: usize) -> Status {
    invalid(
        field,
        format!("is {len} bytes, longer than the CSI limit of {max} bytes"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn message(r: Result<impl std::fmt::Debug, Status>) -> String {
        let e = r.expect_err("must be refused");
        assert_eq!(e.code(), Code::InvalidArgument);
        e.message().to_string()
    }

    #[test]
    fn strings_are_held_to_128_bytes_and_refused_naming_the_field_and_sizes() {
        assert!(string("volume_id", &"v".repeat(128)).is_ok());
        let m = message(string("volume_id", &"v".repeat(129)));
        assert!(m.starts_with("volume_id: is 129 bytes"), "{m}");
        assert!(m.contains("128"), "{m}");
        // Multi-byte characters count in bytes, as the spec says.
        let m = message(string("name", &"é".repeat(65)));
        assert!(m.starts_with("name: is 130 bytes"), "{m}");
        let m = message(string("volume_id", "a\nb"));
        assert!(m.contains("control"), "{m}");
        assert!(message(required_string("volume_id", "")).contains("required"));
    }

    #[test]
    fn maps_and_flags_are_held_to_4_kib_in_all() {
        let ok = HashMap::from([("k".to_string(), "v".repeat(4095))]);
        assert!(map("volume_context", &ok).is_ok());
        let big = HashMap::from([
            ("k".to_string(), "v".repeat(4000)),
            ("l".to_string(), "w".repeat(100)),
        ]);
        let m = message(map("volume_context", &big));
        assert!(m.starts_with("volume_context: is 4102 bytes"), "{m}");
        let many = vec!["nconnect=4".to_string(); 500];
        assert!(message(flags("mount_flags", &many)).starts_with("mount_flags: is 5000 bytes"));
        let long = vec!["ro".to_string(), "x".repeat(129)];
        assert!(message(flags("mount_flags", &long)).starts_with("mount_flags[1]: is 129"));
    }

    #[test]
    fn paths_follow_linux_path_max_and_name_max() {
        let component = "c".repeat(255);
        let p = format!("/{}", [component.as_str(); 15].join("/"));
        assert!(p.len() <= MAX_PATH && path("target_path", &p).is_ok());
        let m = message(path("target_path", &format!("/{}", "c".repeat(256))));
        assert!(m.contains("component of 256 bytes"), "{m}");
        let m = message(path("target_path", &"/a".repeat(2048)));
        assert!(m.starts_with("target_path: is 4096 bytes"), "{m}");
        for bad in ["relative", "/a/../b", "/a/\u{0}b", "/a\nb"] {
            assert!(message(path("target_path", bad)).starts_with("target_path"));
        }
    }

    #[test]
    fn echoes_and_log_values_are_bounded_and_say_the_full_length() {
        let huge = "x".repeat(4 << 20);
        let e = echo(&huge);
        assert!(e.len() < 200 && e.ends_with("... (4194304 bytes)"), "{e}");
        assert_eq!(echo("vol-1"), "\"vol-1\"");
        assert_eq!(echo("a\nb\"c"), "\"a\\nb\\\"c\"");
        // Cut on a character boundary, never inside one.
        let e = echo(&"é".repeat(100));
        assert!(
            e.starts_with("\"é") && e.ends_with("... (200 bytes)"),
            "{e}"
        );
        assert_eq!(log_value("vol-1"), "vol-1");
        assert!(log_value(&huge).len() < 200);
    }
}
