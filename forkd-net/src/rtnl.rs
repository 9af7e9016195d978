//! Links, addresses, routes and neighbours over rtnetlink (the `rtnetlink` crate).
//!
//! Every call opens its own netlink socket on a short-lived thread, in the host namespace or
//! inside a sandbox's (`netns`), and drives it on a current-thread Tokio runtime: callers stay
//! synchronous and never change namespace themselves.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;
use std::path::Path;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::{Handle, LinkUnspec, LinkVeth, RouteMessageBuilder};

use crate::{netns, NetError};

/// An rtnetlink failure, with the errno the kernel reported when there is one.
#[derive(Debug)]
pub struct RtnlError {
    pub errno: Option<i32>,
    pub message: String,
}

impl From<rtnetlink::Error> for RtnlError {
    fn from(e: rtnetlink::Error) -> Self {
        let errno = match &e {
            rtnetlink::Error::NetlinkError(msg) if msg.raw_code() != 0 => Some(msg.raw_code().abs()),
            _ => None,
        };
        RtnlError { errno, message: e.to_string() }
    }
}

impl From<io::Error> for RtnlError {
    fn from(e: io::Error) -> Self {
        RtnlError { errno: e.raw_os_error(), message: e.to_string() }
    }
}

pub type RtnlResult<T> = Result<T, RtnlError>;

fn to_net_error(what: &str, e: RtnlError) -> NetError {
    NetError::Netlink { what: what.to_owned(), errno: e.errno, message: e.message }
}

/// Runs `f` with a netlink handle in the host namespace (`None`) or the namespace at `ns`.
pub fn run<R, F, Fut>(ns: Option<&Path>, what: &str, f: F) -> Result<R, NetError>
where
    R: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = RtnlResult<R>>,
{
    let body = move || -> RtnlResult<R> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
        runtime.block_on(async move {
            let (connection, handle, _) = rtnetlink::new_connection()?;
            let driver = tokio::spawn(connection);
            let result = f(handle).await;
            driver.abort();
            result
        })
    };
    let result = match ns {
        Some(path) => netns::run_in(path, body)?,
        None => std::thread::scope(|s| {
            s.spawn(body).join().unwrap_or_else(|_| Err(io::Error::other("netlink thread panicked").into()))
        }),
    };
    result.map_err(|e| to_net_error(what, e))
}

/// The index of link `name`, `None` if there is no such link.
pub async fn link_index(handle: &Handle, name: &str) -> RtnlResult<Option<u32>> {
    let mut links = handle.link().get().match_name(name.to_owned()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        Err(e) => {
            let e = RtnlError::from(e);
            if e.errno == Some(libc::ENODEV) {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

async fn require_index(handle: &Handle, name: &str) -> RtnlResult<u32> {
    link_index(handle, name)
        .await?
        .ok_or_else(|| RtnlError { errno: Some(libc::ENODEV), message: format!("no link named {name}") })
}

/// Names of every link in the namespace.
pub async fn link_names(handle: &Handle) -> RtnlResult<Vec<String>> {
    let mut links = handle.link().get().execute();
    let mut names = Vec::new();
    while let Some(link) = links.try_next().await? {
        if let Some(name) = link_name(&link) {
            names.push(name);
        }
    }
    Ok(names)
}

fn link_name(link: &LinkMessage) -> Option<String> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name.clone()),
        _ => None,
    })
}

/// Creates a veth pair: `host` here, `peer` directly inside the namespace behind `netns_fd`.
pub async fn add_veth(handle: &Handle, host: &str, peer: &str, netns_fd: RawFd) -> RtnlResult<()> {
    let peer_msg = LinkUnspec::new_with_name(peer).setns_by_fd(netns_fd).build();
    let msg = LinkVeth::new(host, peer).set_info_data(InfoData::Veth(InfoVeth::Peer(peer_msg))).build();
    handle.link().add(msg).execute().await?;
    Ok(())
}

/// Deletes link `name`; `Ok(false)` if it did not exist.
pub async fn delete_link(handle: &Handle, name: &str) -> RtnlResult<bool> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(false);
    };
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(e) => {
            let e = RtnlError::from(e);
            if e.errno == Some(libc::ENODEV) {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

/// Sets the MAC (if given), adds `addr/prefix` (if given) and brings link `name` up.
pub async fn configure_link(
    handle: &Handle,
    name: &str,
    mac: Option<[u8; 6]>,
    addr: Option<(Ipv4Addr, u8)>,
) -> RtnlResult<u32> {
    let index = require_index(handle, name).await?;
    if let Some(mac) = mac {
        handle.link().set(LinkUnspec::new_with_index(index).address(mac.to_vec()).build()).execute().await?;
    }
    if let Some((ip, prefix)) = addr {
        handle.address().add(index, IpAddr::V4(ip), prefix).execute().await?;
    }
    handle.link().set(LinkUnspec::new_with_index(index).up().build()).execute().await?;
    Ok(index)
}

/// Adds the default route via `gateway`.
pub async fn add_default_route(handle: &Handle, gateway: Ipv4Addr) -> RtnlResult<()> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new().gateway(gateway).build();
    handle.route().add(route).execute().await?;
    Ok(())
}

/// Adds a permanent neighbour entry `ip -> mac` on link `index`.
pub async fn add_neighbour(handle: &Handle, index: u32, ip: Ipv4Addr, mac: [u8; 6]) -> RtnlResult<()> {
    handle.neighbours().add(index, IpAddr::V4(ip)).link_layer_address(&mac).replace().execute().await?;
    Ok(())
}
