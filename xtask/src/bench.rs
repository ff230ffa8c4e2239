//! `cargo xtask bench`: figures from one run on the test bed (see README).

pub async fn run() -> anyhow::Result<()> {
    anyhow::bail!("bench: not written yet")
}
