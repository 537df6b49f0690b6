//! Who may join a session and where a stage may send its data (`docs/SECURITY.md`, *Stage*).
//!
//! - **Session keys**: the owner gives each stage a random 128-bit key in `Open`; the previous stage must present it
//!   in `Attach`. A session id alone (it is logged) opens nothing. Every later frame of a session arrives on the
//!   stream its `Open` or `Attach` opened, so it is bound to that stream's QUIC connection and needs no key.
//! - **Next hops**: a stage dials the next hop of an `Open` only when the `Open` carries that hop's signed
//!   announcement, valid now, of the same model and shape, naming exactly that address and certificate and a shard
//!   holding the hop's layers, and those layers start right where this stage's span ends (the last stage dials
//!   nobody). A client cannot make a stage send packets to an address no node signed for.

use shardline_proto::announcement::{SignedAnnouncement, now_ms};
use shardline_proto::wire::SessionOpen;

/// How a stage decides whether it may dial the next hop an `Open` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HopPolicy {
    /// Only a hop vouched for by its signed announcement in the `Open` (every networked stage).
    Signed,
    /// Any hop: for the in-process driver, where a "dial" is a channel to another stage of the same process and no
    /// packet leaves it.
    InProcess,
}

/// Checks the next hop of `open` (if any) under `policy`; the message is for the owner.
pub fn check_next_hop(policy: HopPolicy, open: &SessionOpen) -> Result<(), String> {
    match policy {
        HopPolicy::InProcess => Ok(()),
        HopPolicy::Signed => verify_next_hop(open, now_ms()),
    }
}

/// The [`HopPolicy::Signed`] check at wall-clock time `now_ms` (Unix milliseconds).
pub fn verify_next_hop(open: &SessionOpen, now_ms: u64) -> Result<(), String> {
    let Some(hop) = open.rest.first() else { return Ok(()) };
    // A route is contiguous: the next hop runs the layers right after ours, and the last stage has none (its output
    // goes to the owner). So an `Open` names at most the one hop its own route needs, never an arbitrary node of
    // the model.
    if open.span.end >= open.n_layers as usize {
        return Err(format!("this stage runs the model's last layers ({}): it has no next hop to dial", open.span));
    }
    if hop.layers.start != open.span.end || hop.layers.is_empty() {
        return Err(format!("next hop runs layers {}, not the ones right after {}", hop.layers, open.span));
    }
    if open.next_record.is_empty() {
        return Err(format!("next hop {} comes without its signed announcement: not dialing it", hop.addr));
    }
    let signed = SignedAnnouncement::verify(&open.next_record, now_ms)
        .map_err(|e| format!("next hop {}: its announcement does not verify: {e}", hop.addr))?;
    let a = &signed.announcement;
    if a.model_id != open.model_id || a.n_layers != open.n_layers || a.hidden != open.hidden {
        return Err(format!("next hop {} is announced for another model or shape", hop.addr));
    }
    if a.quic_addr != hop.addr || a.cert_fingerprint != hop.fingerprint {
        return Err(format!(
            "next hop {} is not the address and certificate its announcement names ({})",
            hop.addr, a.quic_addr
        ));
    }
    if hop.layers.start < a.layers.start || hop.layers.end > a.layers.end {
        return Err(format!("next hop {} announces layers {}, not {}", hop.addr, a.layers, hop.layers));
    }
    Ok(())
}
