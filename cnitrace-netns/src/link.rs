//! Netlink plumbing (rtnetlink): namespaces, veths, bridges, VXLAN and IP-in-IP
//! devices, addresses, routes and static neighbours, each configured from inside its
//! namespace through a netlink socket opened there.

use std::{net::Ipv4Addr, os::fd::AsRawFd as _};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkBridge, LinkUnspec, LinkVeth, LinkVxlan, NetworkNamespace, RouteMessageBuilder,
    packet_route::neighbour::NeighbourState,
};

use crate::Error;

#[allow(clippy::needless_pass_by_value)] // used as map_err(|e| netlink(.., e))
fn netlink(what: impl Into<String>, e: rtnetlink::Error) -> Error {
    Error::io(what, std::io::Error::other(e.to_string()))
}

pub async fn add_namespace(name: &str) -> Result<(), Error> {
    NetworkNamespace::add(name.to_owned())
        .await
        .map_err(|e| netlink(format!("create netns {name}"), e))
}

pub async fn delete_namespace(name: &str) -> Result<(), Error> {
    NetworkNamespace::del(name.to_owned())
        .await
        .map_err(|e| netlink(format!("delete netns {name}"), e))
}

/// What [`Ns::set_up`] changes besides the state.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkSettings<'a> {
    pub rename: Option<&'a str>,
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
}

/// A netlink connection whose socket lives in one namespace.
#[derive(Clone)]
pub struct Ns {
    pub name: String,
    handle: Handle,
}

impl Ns {
    /// Opens a netlink socket inside `name` (a socket stays in the namespace it was made in).
    pub fn open(name: &str) -> Result<Self, Error> {
        let file = std::fs::File::open(crate::path(name))
            .map_err(|e| Error::io(format!("open netns {name}"), e))?;
        let runtime = tokio::runtime::Handle::current();
        let (connection, handle, _) = std::thread::spawn(move || {
            // The socket registers with the runtime's reactor as it is made.
            let _entered = runtime.enter();
            crate::enter(&file)?;
            rtnetlink::new_connection().map_err(|e| Error::io("netlink socket", e))
        })
        .join()
        .map_err(|_| Error::Invalid("netlink thread panicked".to_owned()))??;
        tokio::spawn(connection);
        Ok(Self {
            name: name.to_owned(),
            handle,
        })
    }

    pub async fn index(&self, link: &str) -> Result<u32, Error> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(link.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(message)) => Ok(message.header.index),
            Ok(None) | Err(_) => Err(Error::Invalid(format!(
                "no device {link} in netns {}",
                self.name
            ))),
        }
    }

    /// A veth pair with both ends here; `peer` is then usually moved to another namespace.
    pub async fn add_veth(&self, name: &str, peer: &str) -> Result<(), Error> {
        self.handle
            .link()
            .add(LinkVeth::new(name, peer).build())
            .execute()
            .await
            .map_err(|e| netlink(format!("add veth {name}/{peer} in {}", self.name), e))
    }

    /// A veth pair: `name` here, `peer` moved into `peer_ns`, each configured with its settings
    /// and brought up (a pod's interface and its host side).
    pub async fn add_veth_into(
        &self,
        name: &str,
        settings: LinkSettings<'_>,
        peer_ns: &Ns,
        peer: &str,
        peer_settings: LinkSettings<'_>,
    ) -> Result<(), Error> {
        self.add_veth(name, peer).await?;
        self.move_to(peer, &peer_ns.name).await?;
        peer_ns.set_up(peer, peer_settings).await?;
        self.set_up(name, settings).await
    }

    pub async fn add_bridge(&self, name: &str) -> Result<(), Error> {
        self.handle
            .link()
            .add(LinkBridge::new(name).up().build())
            .execute()
            .await
            .map_err(|e| netlink(format!("add bridge {name} in {}", self.name), e))
    }

    /// A point-to-point VXLAN device: every frame goes to `remote`, as with two nodes.
    pub async fn add_vxlan(
        &self,
        name: &str,
        vni: u32,
        port: u16,
        local: Ipv4Addr,
        remote: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), Error> {
        let message = LinkVxlan::new(name, vni)
            .port(port)
            .local(local)
            .remote(remote)
            .learning(false)
            .address(mac.to_vec())
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|e| netlink(format!("add vxlan {name} in {}", self.name), e))
    }

    /// An IP-in-IP tunnel device (module `ipip`).
    pub async fn add_ipip(
        &self,
        name: &str,
        local: Ipv4Addr,
        remote: Ipv4Addr,
    ) -> Result<(), Error> {
        let message = rtnetlink::LinkIpIp::new(name)
            .local(local)
            .remote(remote)
            .ttl(64)
            .build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(|e| netlink(format!("add ipip {name} in {}", self.name), e))
    }

    pub async fn move_to(&self, link: &str, target: &str) -> Result<(), Error> {
        let file = std::fs::File::open(crate::path(target))
            .map_err(|e| Error::io(format!("open netns {target}"), e))?;
        let index = self.index(link).await?;
        self.handle
            .link()
            .set(
                LinkUnspec::new_with_index(index)
                    .setns_by_fd(file.as_raw_fd())
                    .build(),
            )
            .execute()
            .await
            .map_err(|e| netlink(format!("move {link} to {target}"), e))
    }

    /// Renames, sets the MAC and MTU (where given), then brings a device up.
    pub async fn set_up(&self, link: &str, settings: LinkSettings<'_>) -> Result<(), Error> {
        let index = self.index(link).await?;
        // A device must be down to be renamed: name, MAC and MTU first, then up.
        let mut first = LinkUnspec::new_with_index(index);
        if let Some(name) = settings.rename {
            first = first.name(name.to_owned());
        }
        if let Some(mac) = settings.mac {
            first = first.address(mac.to_vec());
        }
        if let Some(mtu) = settings.mtu {
            first = first.mtu(mtu);
        }
        self.handle
            .link()
            .set(first.build())
            .execute()
            .await
            .map_err(|e| netlink(format!("configure {link} in {}", self.name), e))?;
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|e| netlink(format!("bring {link} up in {}", self.name), e))
    }

    pub async fn enslave(&self, link: &str, bridge: &str) -> Result<(), Error> {
        let (index, master) = (self.index(link).await?, self.index(bridge).await?);
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).controller(master).build())
            .execute()
            .await
            .map_err(|e| netlink(format!("attach {link} to {bridge} in {}", self.name), e))
    }

    pub async fn add_address(
        &self,
        link: &str,
        address: Ipv4Addr,
        prefix: u8,
    ) -> Result<(), Error> {
        let index = self.index(link).await?;
        self.handle
            .address()
            .add(index, address.into(), prefix)
            .execute()
            .await
            .map_err(|e| {
                netlink(
                    format!("address {address}/{prefix} on {link} in {}", self.name),
                    e,
                )
            })
    }

    /// A route to `destination/prefix` out of `link`, via `gateway` (on-link) if given.
    pub async fn add_route(
        &self,
        destination: Ipv4Addr,
        prefix: u8,
        link: &str,
        gateway: Option<Ipv4Addr>,
    ) -> Result<(), Error> {
        let index = self.index(link).await?;
        let mut route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(destination, prefix)
            .output_interface(index);
        route = match gateway {
            Some(gateway) => route.gateway(gateway).onlink(),
            None => route.scope(rtnetlink::packet_route::route::RouteScope::Link),
        };
        self.handle
            .route()
            .add(route.build())
            .execute()
            .await
            .map_err(|e| {
                netlink(
                    format!("route {destination}/{prefix} dev {link} in {}", self.name),
                    e,
                )
            })
    }

    /// A permanent neighbour entry (as CNIs do for their gateway or tunnel peers).
    pub async fn add_neighbour(
        &self,
        link: &str,
        address: Ipv4Addr,
        mac: [u8; 6],
    ) -> Result<(), Error> {
        let index = self.index(link).await?;
        self.handle
            .neighbours()
            .add(index, address.into())
            .link_layer_address(&mac)
            .state(NeighbourState::Permanent)
            .execute()
            .await
            .map_err(|e| netlink(format!("neighbour {address} on {link} in {}", self.name), e))
    }

    pub async fn mac(&self, link: &str) -> Result<[u8; 6], Error> {
        use rtnetlink::packet_route::link::LinkAttribute;
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(link.to_owned())
            .execute();
        let message = links
            .try_next()
            .await
            .map_err(|e| netlink(format!("get {link}"), e))?
            .ok_or_else(|| Error::Invalid(format!("no device {link} in {}", self.name)))?;
        message
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(bytes) if bytes.len() == 6 => {
                    let mut mac = [0u8; 6];
                    mac.copy_from_slice(bytes);
                    Some(mac)
                }
                _ => None,
            })
            .ok_or_else(|| Error::Invalid(format!("{link} has no MAC address")))
    }

    /// Writes a sysctl of this namespace (`net.ipv4.ip_forward` -> /proc/sys/net/ipv4/...).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), Error> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let file = std::fs::File::open(crate::path(&self.name))
            .map_err(|e| Error::io(format!("open netns {}", self.name), e))?;
        let value = value.to_owned();
        // /proc/sys/net is the namespace of the task that opens it.
        std::thread::spawn(move || {
            crate::enter(&file)?;
            std::fs::write(&path, value).map_err(|e| Error::io(format!("write {path}"), e))
        })
        .join()
        .map_err(|_| Error::Invalid("sysctl thread panicked".to_owned()))?
    }
}
