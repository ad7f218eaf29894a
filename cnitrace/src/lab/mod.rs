//! The lab: CNI datapaths built from network namespaces on one machine (shaped after CNIs, or
//! made by the CNI reference plugins run as a CNI runtime would), their
//! benchmark, the netfilter rule sweep, kube-proxy's Services, and the project's tc program
//! with an adjustable amount of work per packet.

pub mod bench;
pub mod cni;
pub mod node_rules;
pub mod ovs;
pub mod policy;
pub mod redirect;
pub mod services;
pub mod sweep;
pub mod tc_work;
pub mod topology;
pub mod traffic;

use crate::{error::Error, netns};

/// Runs a rules loader (`iptables-restore`, `nft -f -`) in a lab namespace with `input` on
/// stdin; `what` names the rules in its errors, which also name the missing tool.
pub(crate) fn load_rules(
    netns_name: &str,
    program: &str,
    args: &[&str],
    input: &str,
    what: &str,
) -> Result<(), Error> {
    match netns::output_in(Some(netns_name), program, args, Some(input))? {
        Some(out) if out.status.success() => Ok(()),
        Some(out) => Err(Error::InvalidArgument(format!(
            "{program} of {what} failed in {netns_name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
        None => Err(Error::InvalidArgument(format!(
            "{what} need {program} (apt install {})",
            if program == "nft" {
                "nftables"
            } else {
                "iptables"
            }
        ))),
    }
}
