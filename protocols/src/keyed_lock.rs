//! One async lock per key (a volume name, a CSI volume id, a target path): operations on one
//! key run one at a time, on different keys in parallel. A key's entry exists only while
//! someone holds or waits for its lock, so the table never grows with the keys callers have
//! used; an acquisition given up at its deadline, or dropped while waiting (a cancelled
//! request), leaves nothing behind.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// The lock was still held by another operation at the deadline.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("another operation held the lock until the deadline")]
pub struct LockTimeout;

struct Entry {
    lock: Arc<AsyncMutex<()>>,
    /// Holders and waiters: the entry goes when this drops to zero.
    users: usize,
}

pub struct KeyedLocks<K> {
    table: Mutex<HashMap<K, Entry>>,
}

impl<K: Eq + Hash> Default for KeyedLocks<K> {
    fn default() -> Self {
        KeyedLocks {
            table: Mutex::new(HashMap::new()),
        }
    }
}

/// A held lock. Dropping it releases the lock, then forgets the key if nobody else holds or
/// waits for it.
#[must_use = "the lock is released when the guard is dropped"]
pub struct KeyedGuard<'a, K: Eq + Hash> {
    // Fields drop in order: the lock is released before the key's use is counted off.
    _held: OwnedMutexGuard<()>,
    _user: User<'a, K>,
}

/// One counted use of a key's entry, from the first poll of an acquisition to the guard's
/// drop; counted off on drop, whichever way the acquisition ends.
struct User<'a, K: Eq + Hash> {
    locks: &'a KeyedLocks<K>,
    key: K,
}

impl<K: Eq + Hash> Drop for User<'_, K> {
    fn drop(&mut self) {
        let mut table = self.locks.table();
        if let Some(e) = table.get_mut(&self.key) {
            e.users -= 1;
            if e.users == 0 {
                table.remove(&self.key);
            }
        }
    }
}

impl<K: Eq + Hash> KeyedLocks<K> {
    pub fn new() -> Self {
        Self::default()
    }

    fn table(&self) -> MutexGuard<'_, HashMap<K, Entry>> {
        // The table is consistent after every statement: a panic elsewhere cannot break it.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn enter<Q>(&self, key: &Q) -> (User<'_, K>, Arc<AsyncMutex<()>>)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut table = self.table();
        let lock = match table.get_mut(key) {
            Some(e) => {
                e.users += 1;
                e.lock.clone()
            }
            None => {
                let lock = Arc::new(AsyncMutex::new(()));
                table.insert(
                    key.to_owned(),
                    Entry {
                        lock: lock.clone(),
                        users: 1,
                    },
                );
                lock
            }
        };
        let user = User {
            locks: self,
            key: key.to_owned(),
        };
        (user, lock)
    }

    /// Waits for `key`'s lock as long as it takes.
    pub async fn lock<Q>(&self, key: &Q) -> KeyedGuard<'_, K>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let (user, lock) = self.enter(key);
        KeyedGuard {
            _held: lock.lock_owned().await,
            _user: user,
        }
    }

    /// Waits for `key`'s lock until `deadline`.
    pub async fn lock_until<Q>(
        &self,
        key: &Q,
        deadline: tokio::time::Instant,
    ) -> Result<KeyedGuard<'_, K>, LockTimeout>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let (user, lock) = self.enter(key);
        match tokio::time::timeout_at(deadline, lock.lock_owned()).await {
            Ok(held) => Ok(KeyedGuard {
                _held: held,
                _user: user,
            }),
            Err(_) => Err(LockTimeout),
        }
    }

    /// True while some operation holds or waits for `key`'s lock.
    pub fn is_busy<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.table().contains_key(key)
    }

    /// Keys held or waited for right now.
    pub fn len(&self) -> usize {
        self.table().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn many_tasks_on_few_keys_never_overlap_and_leave_the_table_empty() {
        const KEYS: usize = 4;
        let locks = Arc::new(KeyedLocks::<String>::new());
        let inside: Arc<Vec<AtomicUsize>> =
            Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
        let overlaps = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for i in 0..200 {
            let (locks, inside, overlaps) = (locks.clone(), inside.clone(), overlaps.clone());
            tasks.push(tokio::spawn(async move {
                let k = i % KEYS;
                let _held = locks.lock(&format!("key-{k}")).await;
                if inside[k].fetch_add(1, Ordering::SeqCst) != 0 {
                    overlaps.fetch_add(1, Ordering::SeqCst);
                }
                tokio::task::yield_now().await;
                inside[k].fetch_sub(1, Ordering::SeqCst);
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(overlaps.load(Ordering::SeqCst), 0, "two holders of one key");
        assert_eq!(locks.len(), 0, "the table kept keys nobody uses");
    }

    #[tokio::test]
    async fn a_deadline_is_honoured_and_leaves_only_the_holder_s_entry() {
        let locks = KeyedLocks::<String>::new();
        let held = locks.lock("a").await;
        let start = tokio::time::Instant::now();
        let waited = locks
            .lock_until("a", start + Duration::from_millis(100))
            .await;
        let took = start.elapsed();
        assert_eq!(waited.err(), Some(LockTimeout));
        assert!(
            took >= Duration::from_millis(100) && took < Duration::from_secs(2),
            "{took:?}"
        );
        assert_eq!(locks.len(), 1);
        // Another key is not held up meanwhile.
        let other = locks
            .lock_until(
                "b",
                tokio::time::Instant::now() + Duration::from_millis(100),
            )
            .await
            .expect("b is free");
        assert!(locks.is_busy("a") && locks.is_busy("b"));
        drop((held, other));
        assert!(locks.is_empty());
    }

    #[tokio::test]
    async fn a_waiter_dropped_after_the_holder_released_leaves_no_entry() {
        let locks = KeyedLocks::<String>::new();
        let held = locks.lock("k").await;
        let mut waiter = Box::pin(locks.lock("k"));
        // Polled once: it is queued for the lock.
        assert!(futures::poll!(waiter.as_mut()).is_pending());
        drop(held);
        // A cancelled request: the waiter goes without being polled again.
        drop(waiter);
        assert_eq!(locks.len(), 0, "a cancelled waiter left the key behind");
    }
}
