//! Warnings said once: a problem raised on every poll (a bad annotation, a pod whose
//! cgroup is not there yet) is logged the first time and then kept quiet while it lasts.
use std::collections::HashMap;

use log::warn;

/// The warnings logged, each with the PodList round (generation) that last raised it.
#[derive(Debug, Default)]
pub struct WarnOnce {
    /// Warning text → the generation that last raised it.
    raised_in: HashMap<String, u64>,
    generation: u64,
}

impl WarnOnce {
    /// Logs a warning the first time it is raised; raised again while it lasts (see
    /// [`WarnOnce::end_generation`]) it stays quiet.
    pub fn warn(&mut self, msg: &str) {
        match self.raised_in.get_mut(msg) {
            Some(g) => *g = self.generation,
            None => {
                warn!("{msg}");
                self.raised_in.insert(msg.to_string(), self.generation);
            }
        }
    }

    /// Ends a PodList's round of warnings (call after the sync of a new PodList):
    /// warnings it did not raise again are forgotten, so a pod that is gone takes its
    /// warnings with it (memory stays bounded under churn) and a problem that comes back
    /// later is logged again.
    pub fn end_generation(&mut self) {
        let current = self.generation;
        self.raised_in.retain(|_, g| *g == current);
        self.generation += 1;
    }

    /// Warnings remembered now.
    pub fn remembered(&self) -> usize {
        self.raised_in.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_last_while_raised_and_are_forgotten_with_their_cause() {
        let mut w = WarnOnce::default();
        w.warn("pod a/x: bad annotation");
        w.warn("pod a/y: no cgroup found yet");
        w.warn("pod a/x: bad annotation");
        assert_eq!(w.remembered(), 2);
        w.end_generation();
        // The next PodList still has x's problem; y is gone.
        w.warn("pod a/x: bad annotation");
        w.end_generation();
        assert_eq!(w.remembered(), 1);
        // A long churn of pods, each warned about once, leaves nothing behind.
        for i in 0..10_000 {
            w.warn(&format!("pod a/churn-{i}: no cgroup found yet"));
            w.end_generation();
        }
        assert_eq!(w.remembered(), 1);
    }
}
