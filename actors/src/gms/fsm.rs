//! The lock state machine (runtime spec §2.4): one writer or many readers per (device, tag); readers only
//! after a commit; a waiting writer blocks new readers (writer preference).
//!
//! The state is derived from who holds the lock, never stored. Waiting clients sit in a FIFO queue that
//! [`LockTable::pump`] re-examines after every change, the way Dynamo's condition variable wakes all
//! waiters. Wrong-state calls return [`LockError`]; nothing here panics.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;

use super::protocol::RequestedLockType;

/// Identifies one client connection for the lifetime of the server.
pub type ConnectionId = u64;

/// The derived lock state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockState {
    /// Nothing committed, nobody connected.
    Empty,
    /// A writer holds the lock.
    Rw,
    /// One or more readers hold the lock.
    Ro,
    /// A layout is published and nobody holds the lock.
    Committed,
}

impl LockState {
    /// The wire name (`EMPTY`, `RW`, `RO`, `COMMITTED`).
    pub fn as_str(self) -> &'static str {
        match self {
            LockState::Empty => "EMPTY",
            LockState::Rw => "RW",
            LockState::Ro => "RO",
            LockState::Committed => "COMMITTED",
        }
    }
}

impl fmt::Display for LockState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a connection was granted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// Writer.
    Rw,
    /// Reader.
    Ro,
}

/// What letting go of a connection did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// The writer left without committing: the layout must be wiped (RW_ABORT).
    WriterAborted,
    /// A reader left; `last` when no reader remains (RO_DISCONNECT).
    Reader { last: bool },
    /// The connection was still waiting in a handshake.
    Waiter,
    /// The connection held nothing (a probe, a committed writer, a timed-out waiter).
    Nothing,
}

/// A request that the current state does not allow.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LockError {
    /// Commit from a connection that is not the writer.
    #[error("CommitRequest requires the RW session; state is {0}")]
    NotWriter(LockState),
    /// A second handshake on one connection.
    #[error("HandshakeRequest not allowed: this connection already holds or awaits a lock")]
    AlreadyConnected,
}

#[derive(Debug)]
struct Waiter {
    connection: ConnectionId,
    requested: RequestedLockType,
}

/// Who holds the lock, who waits, and whether a layout is committed.
#[derive(Debug, Default)]
pub struct LockTable {
    /// At most one writer; RW and RO never coexist.
    writer: Option<ConnectionId>,
    readers: BTreeSet<ConnectionId>,
    committed: bool,
    /// Waiting handshakes in arrival order.
    waiters: VecDeque<Waiter>,
}

impl LockTable {
    /// An empty table (state EMPTY).
    pub fn new() -> Self {
        Self::default()
    }

    /// The derived state.
    pub fn state(&self) -> LockState {
        if self.writer.is_some() {
            LockState::Rw
        } else if !self.readers.is_empty() {
            LockState::Ro
        } else if self.committed {
            LockState::Committed
        } else {
            LockState::Empty
        }
    }

    /// Whether a layout is published.
    pub fn committed(&self) -> bool {
        self.committed
    }

    /// `committed ∧ no writer`.
    pub fn is_ready(&self) -> bool {
        self.committed && self.writer.is_none()
    }

    /// Whether a writer holds the lock.
    pub fn has_writer(&self) -> bool {
        self.writer.is_some()
    }

    /// Number of readers holding the lock.
    pub fn reader_count(&self) -> usize {
        self.readers.len()
    }

    /// Writers (explicit RW requests) waiting in a handshake.
    pub fn waiting_writers(&self) -> usize {
        self.waiters
            .iter()
            .filter(|w| w.requested == RequestedLockType::Rw)
            .count()
    }

    /// What `connection` holds now, if anything.
    pub fn held_by(&self, connection: ConnectionId) -> Option<Grant> {
        if self.writer == Some(connection) {
            Some(Grant::Rw)
        } else if self.readers.contains(&connection) {
            Some(Grant::Ro)
        } else {
            None
        }
    }

    fn is_known(&self, connection: ConnectionId) -> bool {
        self.held_by(connection).is_some()
            || self.waiters.iter().any(|w| w.connection == connection)
    }

    fn rw_grantable(&self) -> bool {
        self.writer.is_none() && self.readers.is_empty()
    }

    fn ro_grantable(&self) -> bool {
        self.committed && self.writer.is_none() && self.waiting_writers() == 0
    }

    /// Take the lock now if the state allows it; otherwise queue and return `None`.
    pub fn request(
        &mut self,
        connection: ConnectionId,
        requested: RequestedLockType,
    ) -> Result<Option<Grant>, LockError> {
        if self.is_known(connection) {
            return Err(LockError::AlreadyConnected);
        }
        if let Some(grant) = self.try_grant(connection, requested) {
            return Ok(Some(grant));
        }
        self.waiters.push_back(Waiter {
            connection,
            requested,
        });
        Ok(None)
    }

    fn try_grant(
        &mut self,
        connection: ConnectionId,
        requested: RequestedLockType,
    ) -> Option<Grant> {
        let grant = match requested {
            RequestedLockType::Rw => self.rw_grantable().then_some(Grant::Rw),
            RequestedLockType::Ro => self.ro_grantable().then_some(Grant::Ro),
            RequestedLockType::Auto => {
                if self.rw_grantable() && !self.committed {
                    Some(Grant::Rw)
                } else if self.ro_grantable() {
                    Some(Grant::Ro)
                } else {
                    None
                }
            }
        }?;
        match grant {
            Grant::Rw => {
                self.writer = Some(connection);
                // A new writer means a fresh layout.
                self.committed = false;
            }
            Grant::Ro => {
                self.readers.insert(connection);
            }
        }
        Some(grant)
    }

    /// Grant every waiter the state now allows, in arrival order.
    pub fn pump(&mut self) -> Vec<(ConnectionId, Grant)> {
        let mut granted = Vec::new();
        loop {
            let mut progressed = false;
            let mut index = 0;
            while index < self.waiters.len() {
                let (connection, requested) = {
                    let w = &self.waiters[index];
                    (w.connection, w.requested)
                };
                // Leave the waiter in the queue while deciding, so it still counts as a waiting
                // writer for the readers behind it.
                let was_writer = requested == RequestedLockType::Rw;
                if was_writer && self.rw_grantable() {
                    self.waiters.remove(index);
                    if let Some(g) = self.try_grant(connection, requested) {
                        granted.push((connection, g));
                        progressed = true;
                    }
                    continue;
                }
                if !was_writer {
                    if let Some(g) = self.try_grant(connection, requested) {
                        self.waiters.remove(index);
                        granted.push((connection, g));
                        progressed = true;
                        continue;
                    }
                }
                index += 1;
            }
            if !progressed {
                return granted;
            }
        }
    }

    /// Publish the layout: RW → COMMITTED. The writer no longer holds the lock.
    pub fn commit(&mut self, connection: ConnectionId) -> Result<(), LockError> {
        if self.writer != Some(connection) {
            return Err(LockError::NotWriter(self.state()));
        }
        self.writer = None;
        self.committed = true;
        Ok(())
    }

    /// The connection went away (or gave up waiting).
    pub fn release(&mut self, connection: ConnectionId) -> Release {
        if self.writer == Some(connection) {
            self.writer = None;
            self.committed = false;
            return Release::WriterAborted;
        }
        if self.readers.remove(&connection) {
            return Release::Reader {
                last: self.readers.is_empty(),
            };
        }
        if let Some(pos) = self.waiters.iter().position(|w| w.connection == connection) {
            self.waiters.remove(pos);
            return Release::Waiter;
        }
        Release::Nothing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RequestedLockType::{Auto, Ro, Rw};

    #[test]
    fn writer_commit_readers_cycle() {
        let mut t = LockTable::new();
        assert_eq!(t.state(), LockState::Empty);
        // Readers wait for a commit.
        assert_eq!(t.request(1, Ro), Ok(None));
        assert_eq!(t.request(2, Rw), Ok(Some(Grant::Rw)));
        assert_eq!(t.state(), LockState::Rw);
        assert!(t.pump().is_empty());
        t.commit(2).unwrap();
        assert_eq!(t.state(), LockState::Committed);
        assert_eq!(t.pump(), vec![(1, Grant::Ro)]);
        assert_eq!(t.request(3, Ro), Ok(Some(Grant::Ro)));
        assert_eq!(t.state(), LockState::Ro);
        assert_eq!(t.release(1), Release::Reader { last: false });
        assert_eq!(t.release(3), Release::Reader { last: true });
        assert_eq!(t.state(), LockState::Committed);
        assert!(t.is_ready());
        // The committed writer's disconnect is a no-op.
        assert_eq!(t.release(2), Release::Nothing);
        assert_eq!(t.state(), LockState::Committed);
    }

    #[test]
    fn writer_abort_returns_to_empty_and_new_writer_wipes_commit() {
        let mut t = LockTable::new();
        assert_eq!(t.request(1, Rw), Ok(Some(Grant::Rw)));
        assert_eq!(t.release(1), Release::WriterAborted);
        assert_eq!(t.state(), LockState::Empty);
        assert_eq!(t.request(2, Rw), Ok(Some(Grant::Rw)));
        t.commit(2).unwrap();
        assert_eq!(t.request(3, Rw), Ok(Some(Grant::Rw)));
        assert!(!t.committed());
        // Readers cannot join a writer, and wait again for the next commit.
        assert_eq!(t.request(4, Ro), Ok(None));
        assert_eq!(t.release(3), Release::WriterAborted);
        assert!(t.pump().is_empty());
        assert_eq!(t.state(), LockState::Empty);
    }

    #[test]
    fn waiting_writer_blocks_new_readers_but_not_existing_ones() {
        let mut t = LockTable::new();
        t.request(1, Rw).unwrap();
        t.commit(1).unwrap();
        assert_eq!(t.request(2, Ro), Ok(Some(Grant::Ro)));
        // A writer waits for the reader to leave.
        assert_eq!(t.request(3, Rw), Ok(None));
        assert_eq!(t.waiting_writers(), 1);
        // A new reader is held back by the waiting writer.
        assert_eq!(t.request(4, Ro), Ok(None));
        assert_eq!(t.state(), LockState::Ro);
        assert_eq!(t.release(2), Release::Reader { last: true });
        // The writer goes first; the reader keeps waiting for its commit.
        assert_eq!(t.pump(), vec![(3, Grant::Rw)]);
        assert_eq!(t.waiting_writers(), 0);
        t.commit(3).unwrap();
        assert_eq!(t.pump(), vec![(4, Grant::Ro)]);
    }

    #[test]
    fn auto_is_writer_first_then_reader_after_commit() {
        let mut t = LockTable::new();
        assert_eq!(t.request(1, Auto), Ok(Some(Grant::Rw)));
        assert_eq!(t.request(2, Auto), Ok(None));
        assert_eq!(t.request(3, Auto), Ok(None));
        t.commit(1).unwrap();
        assert_eq!(t.pump(), vec![(2, Grant::Ro), (3, Grant::Ro)]);
        // After an abort with nothing committed, a waiting auto client becomes the writer.
        let mut t = LockTable::new();
        t.request(1, Rw).unwrap();
        t.request(2, Auto).unwrap();
        t.release(1);
        assert_eq!(t.pump(), vec![(2, Grant::Rw)]);
    }

    #[test]
    fn wrong_state_requests_are_errors() {
        let mut t = LockTable::new();
        assert_eq!(t.commit(7), Err(LockError::NotWriter(LockState::Empty)));
        t.request(1, Rw).unwrap();
        assert_eq!(t.request(1, Ro), Err(LockError::AlreadyConnected));
        assert_eq!(t.request(2, Ro), Ok(None));
        assert_eq!(t.request(2, Ro), Err(LockError::AlreadyConnected));
        assert_eq!(t.commit(2), Err(LockError::NotWriter(LockState::Rw)));
        assert_eq!(t.release(2), Release::Waiter);
        assert_eq!(t.release(2), Release::Nothing);
    }
}
