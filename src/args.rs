//! Value parsers shared by the subcommands: each turns a common mistake into an error that shows the right form.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use libp2p::Multiaddr;

/// What `--device` accepts, as the errors list it.
pub const DEVICE_VALUES: &str = "`cpu`, `cuda` (alias `gpu`) or `cuda:N` (GPU number N)";

/// `--bootstrap`, `--swarm`, `--p2p-listen`: a libp2p multiaddr. A `host:port` is refused with the multiaddr that
/// was probably meant (`127.0.0.1:4000` → `/ip4/127.0.0.1/tcp/4000`).
pub fn multiaddr(s: &str) -> Result<Multiaddr, String> {
    match s.parse::<Multiaddr>() {
        Ok(a) => Ok(a),
        Err(e) => Err(match suggest_multiaddr(s) {
            Some(m) => format!("`{s}` is not a multiaddr; did you mean `{m}`?"),
            None => format!("`{s}` is not a multiaddr ({e}); the form is `/ip4/A.B.C.D/tcp/PORT[/p2p/PEER_ID]`"),
        }),
    }
}

/// The multiaddr for a `host:port` (IPv4, IPv6 or DNS name), TCP.
fn suggest_multiaddr(s: &str) -> Option<String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        let ip = if a.is_ipv4() { "ip4" } else { "ip6" };
        return Some(format!("/{ip}/{}/tcp/{}", a.ip(), a.port()));
    }
    let (host, port) = s.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let host = host.trim_start_matches("tcp://");
    let name_like = !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    name_like.then(|| format!("/dns/{host}/tcp/{port}"))
}

/// `--device`: checked when the command line is read, so a misspelling names the accepted values at once.
pub fn device(s: &str) -> Result<String, String> {
    match s.parse::<shardline_kernels::device::DeviceSpec>() {
        Ok(_) => Ok(s.to_string()),
        Err(_) => Err(format!("unknown device `{s}`; accepted: {DEVICE_VALUES}")),
    }
}

/// Checks a `--model` path before anything opens it: a missing path, or a directory that is not a Hugging Face
/// model directory, is reported once with what was expected (and the GGUF files the directory holds, if any).
pub fn check_model_path(path: &Path) -> Result<()> {
    let expected = "--model expects a GGUF file or a Hugging Face model directory (config.json, tokenizer.json and \
                    *.safetensors)";
    if !path.exists() {
        bail!("{} does not exist; {expected}", path.display());
    }
    if path.is_dir() && !path.join("config.json").is_file() {
        let ggufs = gguf_files(path);
        if ggufs.is_empty() {
            bail!("{} is a directory without config.json; {expected}", path.display());
        }
        let list: Vec<String> = ggufs.iter().map(|p| p.display().to_string()).collect();
        bail!("{} is a directory without config.json; {expected}: did you mean {}?", path.display(), list.join(" or "));
    }
    Ok(())
}

/// The `.gguf` files directly inside `dir`, sorted (at most 4).
fn gguf_files(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && p.extension().is_some_and(|x| x.eq_ignore_ascii_case("gguf")))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found.truncate(4);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_gets_the_multiaddr_it_meant() {
        assert_eq!(multiaddr("/ip4/127.0.0.1/tcp/4000").unwrap().to_string(), "/ip4/127.0.0.1/tcp/4000");
        let e = multiaddr("127.0.0.1:4000").unwrap_err();
        assert!(e.contains("did you mean `/ip4/127.0.0.1/tcp/4000`?"), "{e}");
        let e = multiaddr("[::1]:4000").unwrap_err();
        assert!(e.contains("`/ip6/::1/tcp/4000`"), "{e}");
        let e = multiaddr("node-1.lan:4000").unwrap_err();
        assert!(e.contains("`/dns/node-1.lan/tcp/4000`"), "{e}");
        let e = multiaddr("nonsense").unwrap_err();
        assert!(e.contains("/ip4/A.B.C.D/tcp/PORT"), "{e}");
    }

    #[test]
    fn devices_are_checked_and_the_accepted_values_named() {
        for ok in ["cpu", "cuda", "CUDA", "cuda:1", "gpu"] {
            assert_eq!(device(ok).unwrap(), ok);
        }
        let e = device("tpu").unwrap_err();
        assert!(e.contains("unknown device `tpu`") && e.contains("cuda:N"), "{e}");
    }

    #[test]
    fn a_directory_without_config_names_what_was_expected() {
        let dir = tempfile::tempdir().unwrap();
        let e = check_model_path(dir.path()).unwrap_err().to_string();
        assert!(e.contains("GGUF file or a Hugging Face model directory"), "{e}");
        std::fs::write(dir.path().join("m.gguf"), b"GGUF").unwrap();
        let e = check_model_path(dir.path()).unwrap_err().to_string();
        assert!(e.contains("did you mean") && e.contains("m.gguf"), "{e}");
        let e = check_model_path(&dir.path().join("nope.gguf")).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
        assert!(check_model_path(&dir.path().join("m.gguf")).is_ok());
    }
}
