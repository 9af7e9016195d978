//! Event-loop integration: the transport is an `event_manager` subscriber that
//! services queue notifications, deferred work and the device's backend fds.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;

use super::MmioTransport;
use crate::device::{Interest, MAX_DEVICE_TOKEN};

/// Epoll data of the wake eventfd.
const WAKE_TOKEN: u32 = u32::MAX;
/// Epoll data of queue `i`'s notify eventfd is `QUEUE_TOKEN_BASE + i`.
const QUEUE_TOKEN_BASE: u32 = MAX_DEVICE_TOKEN + 1;

/// The device fds currently registered with the event manager.
#[derive(Debug, Default)]
pub(super) struct FdRegistry {
    registered: HashMap<RawFd, (u32, EventSet)>,
    scratch: Vec<Interest>,
}

impl MmioTransport {
    /// Brings epoll registrations in line with what the device wants now.
    ///
    /// Retired fds are removed from epoll while still open, then closed: closing
    /// first would leave a stale entry in the event manager's dispatch table.
    fn reconcile(&mut self, ops: &mut EventOps) {
        let registry = &mut self.registry;
        for fd in self.device.take_retired_fds() {
            if let Some((token, events)) = registry.registered.remove(&fd.as_raw_fd()) {
                remove_from_epoll(ops, fd.as_raw_fd(), token, events);
            }
            drop(fd);
        }

        let mut wanted = std::mem::take(&mut registry.scratch);
        wanted.clear();
        self.device.interest_list(&mut wanted);
        wanted.retain(|interest| {
            let valid = interest.token <= MAX_DEVICE_TOKEN;
            if !valid {
                tracing::error!(token = interest.token, "device used a reserved event token");
            }
            valid
        });
        wanted.sort_unstable_by_key(|interest| interest.fd);

        registry.registered.retain(|&fd, &mut (token, events)| {
            let still_wanted = wanted.binary_search_by_key(&fd, |interest| interest.fd).is_ok();
            if !still_wanted {
                remove_from_epoll(ops, fd, token, events);
            }
            still_wanted
        });

        for interest in &wanted {
            match registry.registered.get(&interest.fd).copied() {
                Some((token, events)) if token == interest.token && events == interest.events => {}
                Some((token, _)) if token == interest.token => {
                    let update = Events::with_data_raw(interest.fd, token, interest.events);
                    match ops.modify(update) {
                        Ok(()) => {
                            registry.registered.insert(interest.fd, (token, interest.events));
                        }
                        // The old entry stays, so a later pass retries or removes it.
                        Err(err) => tracing::warn!(fd = interest.fd, ?err, "epoll modify failed"),
                    }
                }
                Some((token, events)) => {
                    // Same fd number, different owner: re-register under the new token.
                    remove_from_epoll(ops, interest.fd, token, events);
                    registry.registered.remove(&interest.fd);
                    add_to_epoll(ops, &mut registry.registered, interest);
                }
                None => add_to_epoll(ops, &mut registry.registered, interest),
            }
        }
        registry.scratch = wanted;
    }

    fn run_pending(&mut self) {
        let scan_queues = std::mem::take(&mut self.scan_queues_on_wake);
        let queue_count = self.queues.len();
        let (device, mut ctx) = self.device_context();
        device.process_pending(&mut ctx);
        if scan_queues && ctx.is_active() {
            for index in 0..queue_count {
                device.process_queue(index, &mut ctx);
            }
        }
        let requeue = ctx.take_requeue();
        self.requeue(requeue);
    }

    /// Re-signals the queues a device left work on; their events come back
    /// after everything else that is ready on the loop.
    fn requeue(&self, mask: u64) {
        for (index, event) in self.queue_events.iter().enumerate().take(64) {
            if mask & (1 << index) != 0 {
                if let Err(err) = event.write(1) {
                    tracing::warn!(%err, "failed to re-signal queue event");
                }
            }
        }
    }
}

fn add_to_epoll(ops: &mut EventOps, registered: &mut HashMap<RawFd, (u32, EventSet)>, interest: &Interest) {
    let events = Events::with_data_raw(interest.fd, interest.token, interest.events);
    match ops.add(events) {
        Ok(()) => {
            registered.insert(interest.fd, (interest.token, interest.events));
        }
        Err(err) => tracing::warn!(fd = interest.fd, ?err, "failed to watch device fd"),
    }
}

fn remove_from_epoll(ops: &mut EventOps, fd: RawFd, token: u32, events: EventSet) {
    if let Err(err) = ops.remove(Events::with_data_raw(fd, token, events)) {
        tracing::warn!(fd, ?err, "failed to unwatch device fd");
    }
}

impl MutEventSubscriber for MmioTransport {
    fn init(&mut self, ops: &mut EventOps) {
        // A fresh event manager (first start, or the child's after a fork).
        self.registry = FdRegistry::default();
        let wake = Events::with_data(&self.wake, WAKE_TOKEN, EventSet::IN);
        if let Err(err) = ops.add(wake) {
            tracing::error!(?err, "failed to watch the virtio wake eventfd");
        }
        for (index, event) in self.queue_events.iter().enumerate() {
            let token = QUEUE_TOKEN_BASE + index as u32;
            if let Err(err) = ops.add(Events::with_data(event, token, EventSet::IN)) {
                tracing::error!(?err, queue = index, "failed to watch queue eventfd");
            }
        }
        self.reconcile(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == WAKE_TOKEN {
            let _ = self.wake.read();
            self.run_pending();
        } else if token >= QUEUE_TOKEN_BASE {
            let index = (token - QUEUE_TOKEN_BASE) as usize;
            if let Some(event) = self.queue_events.get(index) {
                // EAGAIN just means a racing read already consumed the count.
                let _ = event.read();
            }
            if self.activated && index < self.queues.len() {
                let (device, mut ctx) = self.device_context();
                device.process_queue(index, &mut ctx);
                let requeue = ctx.take_requeue();
                self.requeue(requeue);
            }
        } else {
            let (device, mut ctx) = self.device_context();
            device.process_backend(token, events.event_set(), &mut ctx);
            let requeue = ctx.take_requeue();
            self.requeue(requeue);
        }
        self.reconcile(ops);
    }
}
