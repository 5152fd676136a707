//! Poison-tolerant locking. Holdfast's mutexes guard plain data (caches, counters,
//! queues, session sets) that a panicking holder cannot leave half-repaired in a way a
//! later user could detect or fix, so a poisoned lock is taken as it is instead of
//! spreading the panic to every other thread.

#![forbid(unsafe_code)]

use std::sync::{Condvar, Mutex, MutexGuard, TryLockError};
use std::time::Duration;

/// Locks `m`, also when a holder panicked.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Locks `m` when it is free (also when a holder panicked); `None` when it is held.
pub fn try_lock<T: ?Sized>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// The value of a mutex no one else holds any more, also when a holder panicked.
pub fn into_inner<T>(m: Mutex<T>) -> T {
    m.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// Waits on `c` for at most `d` and locks again, also when a holder panicked.
pub fn wait_timeout<'a, T>(c: &Condvar, g: MutexGuard<'a, T>, d: Duration) -> MutexGuard<'a, T> {
    match c.wait_timeout(g, d) {
        Ok((g, _)) => g,
        Err(p) => p.into_inner().0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn poisoned_locks_are_taken() {
        let m = Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(try_lock(&m).map(|g| *g), Some(2));
        let c = Condvar::new();
        let g = wait_timeout(&c, lock(&m), Duration::from_millis(1));
        assert_eq!(*g, 2);
        drop(g);
        let m = Arc::into_inner(m).unwrap();
        assert_eq!(into_inner(m), 2);
    }

    #[test]
    fn held_lock_is_not_taken() {
        let m = Mutex::new(());
        let _g = lock(&m);
        assert!(try_lock(&m).is_none());
    }
}
