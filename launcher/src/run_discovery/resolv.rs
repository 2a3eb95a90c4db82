//! The resolv.conf the app sees. The local server becomes the only nameserver; the run zone
//! is the first search domain and `ndots:1`, so a single-label name (`hello`) gets the zone
//! (`hello.run.internal.`, answered locally) while every name with a dot goes out as written
//! first: an external lookup (`www.example.com`) costs the same single upstream query as
//! without krun (runsd's `ndots:4` made it pay local NXDOMAINs first). `SVC.REGION` is asked
//! as written too, and the local server answers it. The original search domains and options
//! (but `ndots`) are kept after ours.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

/// What the original file said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvConf {
    /// `nameserver` lines, in order.
    pub nameservers: Vec<IpAddr>,
    /// The `search` (or `domain`) domains.
    pub search: Vec<String>,
    /// `options`, without `ndots`.
    pub options: Vec<String>,
}

impl ResolvConf {
    /// Parses the parts we keep; comments and unknown lines are dropped.
    pub fn parse(text: &str) -> ResolvConf {
        let mut conf = ResolvConf::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some("nameserver") => {
                    if let Some(ip) = words.next().and_then(|w| w.parse().ok()) {
                        conf.nameservers.push(ip);
                    }
                }
                Some("search" | "domain") => {
                    conf.search = words.map(|w| w.trim_end_matches('.').to_owned()).collect();
                }
                Some("options") => conf.options.extend(
                    words
                        .filter(|w| !w.starts_with("ndots:"))
                        .map(str::to_owned),
                ),
                _ => {}
            }
        }
        conf
    }

    /// The upstream the local server forwards to: the first nameserver, port 53.
    pub fn upstream(&self) -> Option<SocketAddr> {
        self.nameservers.first().map(|ip| SocketAddr::new(*ip, 53))
    }

    /// The rewritten file: `nameserver` = the local server, the zone searched first, ndots 1.
    pub fn rewritten(&self, local: IpAddr, zone: &str) -> String {
        let mut search = vec![zone.trim_end_matches('.').to_owned()];
        search.extend(self.search.iter().filter(|s| *s != zone).cloned());
        let mut options = vec!["ndots:1".to_owned()];
        options.extend(self.options.iter().cloned());
        format!(
            "# written by krun: Cloud Run service discovery (KRUN_RUN_DOMAIN={zone})\nnameserver {local}\nsearch {}\noptions {}\n",
            search.join(" "),
            options.join(" ")
        )
    }
}

/// Overwrites `path` in place (not by rename: `/etc/resolv.conf` is usually a bind mount).
pub fn write_in_place(path: &Path, text: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zone_goes_first_with_ndots_1_and_the_rest_is_kept() {
        let conf = ResolvConf::parse(
            "# cloud run\nnameserver 169.254.169.254\nnameserver 8.8.8.8\nsearch google.internal.\noptions ndots:5 timeout:2\n",
        );
        assert_eq!(
            conf.upstream(),
            Some("169.254.169.254:53".parse().expect("addr"))
        );
        assert_eq!(
            conf.rewritten("127.0.0.1".parse().expect("ip"), "run.internal"),
            "# written by krun: Cloud Run service discovery (KRUN_RUN_DOMAIN=run.internal)\nnameserver 127.0.0.1\nsearch run.internal google.internal\noptions ndots:1 timeout:2\n"
        );
    }
}
