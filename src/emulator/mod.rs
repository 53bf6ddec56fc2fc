//! placeholder until the emulator lands
pub async fn run_cli(
    _l: Option<std::net::SocketAddr>,
    _c: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    anyhow::bail!("not built")
}
