//! Reading Kubernetes YAML strictly as the typed API (k8s-openapi), for the configs suites.

use anyhow::{ensure, Context};
use serde_json::Value as Json;

/// Paths of `orig` that are missing or changed in `back` (an object read as a typed API
/// object and written again): a misspelled or misplaced field does not survive the trip.
fn lost_in_round_trip(orig: &Json, back: &Json, at: &str, out: &mut Vec<String>) {
    match (orig, back) {
        (Json::Object(o), Json::Object(b)) => {
            for (k, v) in o {
                match b.get(k) {
                    Some(bv) => lost_in_round_trip(v, bv, &format!("{at}.{k}"), out),
                    None => out.push(format!("{at}.{k} (unknown field)")),
                }
            }
        }
        (Json::Array(o), Json::Array(b)) if o.len() == b.len() => {
            for (i, (v, bv)) in o.iter().zip(b).enumerate() {
                lost_in_round_trip(v, bv, &format!("{at}[{i}]"), out);
            }
        }
        _ if orig == back => {}
        _ => out.push(format!("{at}: {orig} became {back}")),
    }
}

/// Reads `doc` as a `T` of the Kubernetes API (types, required fields, apiVersion and kind
/// checked by k8s-openapi) and refuses fields the API does not have.
pub fn strict<T>(doc: &Json) -> anyhow::Result<T>
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    let typed: T =
        serde_json::from_value(doc.clone()).context("not a valid object of this kind")?;
    let back = serde_json::to_value(&typed)?;
    let mut lost = Vec::new();
    lost_in_round_trip(doc, &back, "", &mut lost);
    ensure!(lost.is_empty(), "fields the API does not know: {lost:?}");
    Ok(typed)
}
