//! What strangers on a port may use, free of I/O: a token bucket and an open-connection cap per source
//! address, with bounded memory, and a tally that turns refusals into one log line per interval instead of
//! one per request.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::Duration;
use tokio::time::Instant;

/// Requests per second one source may make on average, its burst, and connections it may hold open.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceLimits {
    pub rate: f64,
    pub burst: f64,
    pub connections: usize,
    /// Sources remembered at most (idle ones are forgotten first).
    pub sources: usize,
}

impl Default for SourceLimits {
    fn default() -> Self {
        SourceLimits { rate: 5.0, burst: 30.0, connections: 16, sources: 10_000 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The source has used up its requests for now.
    Rate,
    /// The source holds as many connections as it may.
    Connections,
}

#[derive(Debug)]
struct Source {
    tokens: f64,
    at: Instant,
    open: usize,
}

#[derive(Debug, Default)]
pub struct SourceLimiter {
    limits: SourceLimits,
    sources: HashMap<IpAddr, Source>,
}

impl SourceLimiter {
    pub fn new(limits: SourceLimits) -> Self {
        SourceLimiter { limits, sources: HashMap::new() }
    }

    fn source(&mut self, ip: IpAddr, now: Instant) -> &mut Source {
        if !self.sources.contains_key(&ip) && self.sources.len() >= self.limits.sources {
            // Forget sources with nothing open whose bucket has refilled: they lose nothing.
            let (rate, burst) = (self.limits.rate, self.limits.burst);
            self.sources.retain(|_, s| {
                s.open > 0 || s.tokens + now.saturating_duration_since(s.at).as_secs_f64() * rate < burst
            });
            if self.sources.len() >= self.limits.sources {
                self.sources.retain(|_, s| s.open > 0);
            }
        }
        let burst = self.limits.burst;
        let s = self.sources.entry(ip).or_insert(Source { tokens: burst, at: now, open: 0 });
        s.tokens = (s.tokens + now.saturating_duration_since(s.at).as_secs_f64() * self.limits.rate).min(burst);
        s.at = now;
        s
    }

    /// A new connection from `ip`: admitted (and counted open) or refused. A source that has used up its
    /// requests gets no new connection either; the connection itself spends nothing (its requests do).
    pub fn connect(&mut self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        let max = self.limits.connections;
        let s = self.source(ip, now);
        if s.open >= max {
            return Err(Refusal::Connections);
        }
        if s.tokens < 1.0 {
            return Err(Refusal::Rate);
        }
        s.open += 1;
        Ok(())
    }

    /// A request on an open connection of `ip`.
    pub fn request(&mut self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        let s = self.source(ip, now);
        if s.tokens < 1.0 {
            return Err(Refusal::Rate);
        }
        s.tokens -= 1.0;
        Ok(())
    }

    pub fn disconnect(&mut self, ip: IpAddr) {
        if let Some(s) = self.sources.get_mut(&ip) {
            s.open = s.open.saturating_sub(1);
        }
    }

    pub fn remembered(&self) -> usize {
        self.sources.len()
    }
}

/// Counts refusals by kind; says when to log them (the first at once, then at most once per interval).
#[derive(Debug)]
pub struct Tally {
    interval: Duration,
    counts: BTreeMap<&'static str, u64>,
    last: Option<Instant>,
}

impl Tally {
    pub fn new(interval: Duration) -> Self {
        Tally { interval, counts: BTreeMap::new(), last: None }
    }

    /// Counts one `what`; returns the counts since the last log line when one is due now.
    pub fn count(&mut self, what: &'static str, now: Instant) -> Option<BTreeMap<&'static str, u64>> {
        *self.counts.entry(what).or_default() += 1;
        let due = self.last.is_none_or(|l| now.saturating_duration_since(l) >= self.interval);
        due.then(|| {
            self.last = Some(now);
            std::mem::take(&mut self.counts)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    #[tokio::test(start_paused = true)]
    async fn a_source_gets_its_burst_then_its_rate() {
        let mut l = SourceLimiter::new(SourceLimits { rate: 2.0, burst: 4.0, connections: 100, sources: 10 });
        let now = Instant::now();
        for _ in 0..4 {
            assert_eq!(l.request(ip(1), now), Ok(()));
        }
        assert_eq!(l.request(ip(1), now), Err(Refusal::Rate));
        assert_eq!(l.request(ip(2), now), Ok(()), "another source is not affected");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(l.request(ip(1), Instant::now()), Ok(()), "one more after 1/rate");
        assert_eq!(l.request(ip(1), Instant::now()), Err(Refusal::Rate));
    }

    #[tokio::test(start_paused = true)]
    async fn open_connections_are_capped_per_source_and_memory_is_bounded() {
        let mut l = SourceLimiter::new(SourceLimits { rate: 100.0, burst: 100.0, connections: 2, sources: 3 });
        let now = Instant::now();
        assert!(l.connect(ip(1), now).is_ok() && l.connect(ip(1), now).is_ok());
        assert_eq!(l.connect(ip(1), now), Err(Refusal::Connections));
        l.disconnect(ip(1));
        assert!(l.connect(ip(1), now).is_ok());
        for n in 2..200 {
            let _ = l.request(ip(n), now);
            assert!(l.remembered() <= 3, "{}", l.remembered());
        }
        assert_eq!(l.connect(ip(1), now), Err(Refusal::Connections), "a source with open connections is kept");
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_are_logged_once_per_interval() {
        let mut t = Tally::new(Duration::from_secs(60));
        assert_eq!(t.count("rate", Instant::now()).map(|c| c["rate"]), Some(1), "the first at once");
        for _ in 0..999 {
            assert!(t.count("rate", Instant::now()).is_none());
        }
        t.count("connections", Instant::now());
        tokio::time::advance(Duration::from_secs(60)).await;
        let c = t.count("rate", Instant::now()).unwrap();
        assert_eq!((c["rate"], c["connections"]), (1000, 1));
    }
}
