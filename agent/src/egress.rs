//! The egress policy: what a run's containers reach beyond their own network. By default a run
//! reaches the internet and its own sidecars, and not: the engine's host itself (on any of its
//! addresses: the agent's and master's ports, the engine, anything listening there), link-local
//! and cloud metadata addresses, and the private ranges the operator names
//! (`CIMASTER_AGENT_DENY_CIDRS`, by default every private, link-local and carrier-grade NAT
//! range) — except what a job's own `egress.allow` lists.
//!
//! The agent enforces it on the engine it drives, whatever runs the agent (a host, compose, a
//! Kubernetes pod beside a dind engine): every bridge it makes is named `cimbr…`, and a short-lived
//! helper container in the engine host's network namespace (the agent's git image, with iptables,
//! `NET_ADMIN` and nothing else) loads the rules with `iptables-restore --noflush`, all at once:
//!
//! - `DOCKER-USER` (where Docker lets an operator filter forwarded traffic) sends what comes from a
//!   `cimbr` bridge to `CIMASTER-EGRESS`: replies pass, traffic to another CIMaster bridge is left
//!   to Docker (its own isolation drops what crosses between networks), a run's allowed ranges pass
//!   (`CIMASTER-ALLOW`, rules per bridge while the run holds it), and the denied ranges are refused;
//! - `INPUT` sends what comes from a `cimbr` bridge to the host itself to `CIMASTER-INPUT`, which
//!   refuses it all but replies: the host's own ports are never a job's.
//!
//! The rules are the engine's, shared by every agent on it (the last to start sets the denied
//! ranges). An agent that cannot load them does not start, unless `CIMASTER_AGENT_EGRESS=off`.

pub use cimaster_common::Cidr;
use sha2::{Digest, Sha256};

/// The start of every bridge's name the agent makes (at most 15 characters in all).
pub const BRIDGE_PREFIX: &str = "cimbr";

/// The private ranges a run does not reach unless the operator says otherwise.
pub const DEFAULT_DENY: &str = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,169.254.0.0/16,100.64.0.0/10";

/// The ranges of `CIMASTER_AGENT_DENY_CIDRS`: comma-separated, or `none`.
pub fn parse_deny(text: &str) -> Result<DenyList, String> {
    if text.trim() == "none" {
        return Ok(DenyList(Vec::new()));
    }
    text.split(',').filter(|part| !part.trim().is_empty()).map(str::parse).collect::<Result<_, _>>().map(DenyList)
}

/// The ranges no run reaches unless its job allows them.
#[derive(Debug, Clone)]
pub struct DenyList(pub Vec<Cidr>);

impl std::ops::Deref for DenyList {
    type Target = [Cidr];
    fn deref(&self) -> &[Cidr] {
        &self.0
    }
}

/// The bridge name of a network the agent makes: the prefix and a digest of the network's name.
pub fn bridge_name(network: &str) -> String {
    let digest = hex::encode(Sha256::digest(network.as_bytes()));
    format!("{BRIDGE_PREFIX}{}", &digest[..10])
}

/// What `iptables-restore --noflush` loads: both chains made anew (the allow chain kept: it holds
/// the rules of runs in progress), in one commit.
pub fn rules(deny: &[Cidr]) -> String {
    let mut out = String::from("*filter\n:CIMASTER-EGRESS - [0:0]\n:CIMASTER-INPUT - [0:0]\n");
    out.push_str("-A CIMASTER-EGRESS -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n");
    out.push_str(&format!("-A CIMASTER-EGRESS -o {BRIDGE_PREFIX}+ -j RETURN\n"));
    out.push_str("-A CIMASTER-EGRESS -j CIMASTER-ALLOW\n");
    for cidr in deny {
        out.push_str(&format!("-A CIMASTER-EGRESS -d {cidr} -j REJECT --reject-with icmp-admin-prohibited\n"));
    }
    out.push_str("-A CIMASTER-INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n");
    out.push_str("-A CIMASTER-INPUT -j REJECT --reject-with icmp-admin-prohibited\n");
    out.push_str("COMMIT\n");
    out
}

/// The helper's script: finds which iptables holds Docker's chains (nft or legacy), makes the
/// allow chain if it is missing, loads `CIMASTER_EGRESS_RULES`, and makes sure `DOCKER-USER` and
/// `INPUT` jump to it first.
pub const LOAD_SCRIPT: &str = r#"set -eu
if iptables-nft -w -S DOCKER-USER >/dev/null 2>&1; then ipt=iptables-nft
elif iptables-legacy -w -S DOCKER-USER >/dev/null 2>&1; then ipt=iptables-legacy
else echo "no DOCKER-USER chain in the engine's iptables (nft or legacy)"; exit 3; fi
$ipt -w -S CIMASTER-ALLOW >/dev/null 2>&1 || $ipt -w -N CIMASTER-ALLOW
printf '%s' "$CIMASTER_EGRESS_RULES" | $ipt-restore -w --noflush
jump() { $ipt -w -C "$1" -i "$CIMASTER_BRIDGES+" -j "$2" 2>/dev/null || $ipt -w -I "$1" -i "$CIMASTER_BRIDGES+" -j "$2"; }
jump DOCKER-USER CIMASTER-EGRESS
jump INPUT CIMASTER-INPUT
echo "egress rules loaded ($ipt)"
"#;

/// The helper's script for one run's allowed ranges: `add` or `remove` the rules of bridge
/// `CIMASTER_BRIDGE` for `CIMASTER_ALLOW` (space-separated ranges).
pub const ALLOW_SCRIPT: &str = r#"set -eu
if iptables-nft -w -S CIMASTER-ALLOW >/dev/null 2>&1; then ipt=iptables-nft
elif iptables-legacy -w -S CIMASTER-ALLOW >/dev/null 2>&1; then ipt=iptables-legacy
else echo "the egress rules are not loaded"; exit 3; fi
for cidr in $CIMASTER_ALLOW; do
  if [ "$1" = add ]; then
    $ipt -w -A CIMASTER-ALLOW -i "$CIMASTER_BRIDGE" -d "$cidr" -j ACCEPT
  else
    while $ipt -w -D CIMASTER-ALLOW -i "$CIMASTER_BRIDGE" -d "$cidr" -j ACCEPT 2>/dev/null; do :; done
  fi
done
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_deny_list_parses() {
        let deny = parse_deny(DEFAULT_DENY).unwrap();
        assert_eq!(deny.len(), 5);
        assert_eq!(deny[1].to_string(), "172.16.0.0/12");
        assert!(parse_deny("none").unwrap().is_empty());
        assert!(parse_deny("10.0.0.0/8,nope").is_err());
    }

    #[test]
    fn bridge_names_fit_and_are_the_agents() {
        let name = bridge_name("cimaster-net-0123");
        assert_eq!(name.len(), 15, "{name}");
        assert!(name.starts_with(BRIDGE_PREFIX));
        assert_ne!(name, bridge_name("cimaster-net-0124"));
    }

    #[test]
    fn the_rules_refuse_the_denied_ranges_after_replies_other_bridges_and_allowed_ranges() {
        let rules = rules(&parse_deny("10.0.0.0/8,169.254.0.0/16").unwrap());
        let lines: Vec<&str> = rules.lines().collect();
        let at = |needle: &str| lines.iter().position(|line| line.contains(needle)).unwrap();
        assert!(at("ESTABLISHED") < at("-o cimbr+"));
        assert!(at("-o cimbr+") < at("-j CIMASTER-ALLOW"));
        assert!(at("-j CIMASTER-ALLOW") < at("-d 10.0.0.0/8"));
        assert!(rules.contains("-A CIMASTER-EGRESS -d 169.254.0.0/16 -j REJECT"));
        assert!(rules.ends_with("-A CIMASTER-INPUT -j REJECT --reject-with icmp-admin-prohibited\nCOMMIT\n"));
    }
}
