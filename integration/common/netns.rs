//! A network namespace joined to the host by a veth pair (`ip netns`, root only): a process
//! started in it reaches the host's addresses, and is reached, through the pair alone, so taking
//! the host's end down cuts its network while it runs.

use std::process::Command;

/// One namespace and its pair: the host's end `host_ip`, the namespace's `ns_ip` (a /30 of
/// 10.231.x.0 of its own).
pub struct Netns {
    name: String,
    host_if: String,
    pub host_ip: String,
    pub ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e} (the network cut needs iproute2)"));
    assert!(
        out.status.success(),
        "ip {args:?}: {} (the network cut needs root: CAP_NET_ADMIN)",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

impl Netns {
    /// A namespace named after `tag` and this process (`tag` below 256 picks the subnet).
    pub fn create(tag: u8) -> Netns {
        let pid = std::process::id();
        let name = format!("twhin-{tag}-{pid}");
        let (host_if, ns_if) = (format!("twh{tag}h{}", pid % 10_000), format!("twh{tag}n"));
        let (host_ip, ns_ip) = (format!("10.231.{tag}.1"), format!("10.231.{tag}.2"));
        ip(&["netns", "add", &name]);
        let ns = Netns {
            name,
            host_if,
            host_ip,
            ns_ip,
        };
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &ns.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ]);
        ip(&["link", "set", &ns.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("{}/30", ns.ns_ip), "dev", &ns_if]);
        inside(&["link", "set", &ns_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        ns
    }

    /// The command prefix that runs a program in the namespace.
    pub fn exec_prefix(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// Cut the namespace off: nothing goes either way until [`Netns::restore`].
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]);
    }

    pub fn restore(&self) {
        ip(&["link", "set", &self.host_if, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the pair, and with it the host's.
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
        let _ = Command::new("ip")
            .args(["link", "delete", &self.host_if])
            .output();
    }
}
