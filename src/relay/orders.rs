//! What the bridge tells a pump while it forwards, through a per-pump inbox held inside the
//! session (a channel would cost every session two heap blocks of slots).

use std::sync::Mutex;

use tokio::sync::Notify;

use crate::close::Notice;

/// What a pump must write to its sink before it stops forwarding and drains its source.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CloseOrder {
    /// A JSON error text frame sent before the close (client side only).
    pub error_json: Option<String>,
    /// Close code and wire reason; `None` when the sink's peer is already gone.
    pub close: Option<(u16, &'static str)>,
}

impl From<Notice> for CloseOrder {
    fn from(notice: Notice) -> CloseOrder {
        CloseOrder {
            error_json: notice.error.map(|e| e.to_json()),
            close: notice.close,
        }
    }
}

/// An order for a pump.
#[derive(Debug)]
pub enum Order {
    /// Send a keepalive ping to the sink's peer.
    Ping,
    /// Stop forwarding: write this to the sink, then drain the source.
    Close(Box<CloseOrder>),
    /// Keep forwarding until the source's own Close (or the close timeout), then write this
    /// instead of that Close: the client that broke the protocol still gets what its replica
    /// sent before the replica heard of it.
    CloseAfterSource(Box<CloseOrder>),
}

/// A pump's order inbox: one slot per kind of order. The bridge posts at most one close order
/// of each kind per pump; pings between are merged.
#[derive(Default)]
pub struct Inbox {
    pending: Mutex<Pending>,
    posted: Notify,
}

#[derive(Default)]
struct Pending {
    ping: bool,
    close_after_source: Option<Box<CloseOrder>>,
    close: Option<Box<CloseOrder>>,
}

impl Inbox {
    /// Leave an order for the pump. A second close order of the same kind is dropped: the
    /// first one decides how the pump ends.
    pub fn post(&self, order: Order) {
        {
            let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            match order {
                Order::Ping => pending.ping = true,
                Order::CloseAfterSource(order) => {
                    pending.close_after_source.get_or_insert(order);
                }
                Order::Close(order) => {
                    pending.close.get_or_insert(order);
                }
            }
        }
        self.posted.notify_one();
    }

    /// An order that has already arrived, if any (never waits). Close orders come first: a
    /// ping is moot once the pump is closing.
    pub fn take(&self) -> Option<Order> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(order) = pending.close_after_source.take() {
            return Some(Order::CloseAfterSource(order));
        }
        if let Some(order) = pending.close.take() {
            return Some(Order::Close(order));
        }
        std::mem::take(&mut pending.ping).then_some(Order::Ping)
    }

    /// The next order. Cancel-safe: an order is only taken out when it is returned.
    pub async fn next(&self) -> Order {
        loop {
            // A post between `take` and the wait leaves a permit, so it is not missed.
            if let Some(order) = self.take() {
                return order;
            }
            self.posted.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::Poll;
    use std::time::Duration;

    #[tokio::test]
    async fn close_orders_come_first_and_the_first_of_each_kind_stands() {
        let close = |code| {
            Box::new(CloseOrder {
                error_json: None,
                close: Some((code, "")),
            })
        };
        let code = |order: Option<Order>| match order {
            Some(Order::Close(o)) | Some(Order::CloseAfterSource(o)) => o.close.unwrap().0,
            Some(Order::Ping) => 0,
            None => 1,
        };
        let inbox = Inbox::default();
        assert_eq!(code(inbox.take()), 1, "empty");
        inbox.post(Order::Ping);
        inbox.post(Order::Ping);
        inbox.post(Order::Close(close(1001)));
        inbox.post(Order::Close(close(1011)));
        inbox.post(Order::CloseAfterSource(close(1002)));
        assert_eq!(code(inbox.take()), 1002);
        assert_eq!(code(inbox.take()), 1001, "the first close order stands");
        assert_eq!(code(inbox.take()), 0, "two pings merge into one");
        assert_eq!(code(inbox.take()), 1, "empty again");

        // A pump already waiting is woken by a post.
        let mut waiting = std::pin::pin!(inbox.next());
        let first = std::future::poll_fn(|cx| Poll::Ready(waiting.as_mut().poll(cx))).await;
        assert!(first.is_pending());
        inbox.post(Order::Close(close(1000)));
        let order = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert_eq!(code(order.ok()), 1000);
    }
}
