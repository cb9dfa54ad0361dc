//! StatsD has no labels: [`FlattenLabels`] appends each label's value to the metric name, in
//! the order the labels were given (`tasks{queue=default,state=ready}` becomes
//! `tasks.default.ready`), as Airflow names its per-pool and per-DAG metrics.
//! `config/statsd-mapping.yml` maps the flattened names back to labels.
//!
//! Label values are made safe for the StatsD line protocol and for one dotted component: any
//! character other than ASCII letters, digits, `-` and `_` becomes `_`.

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// Wraps a recorder so that it sees label-free, flattened names.
pub struct FlattenLabels<R> {
    inner: R,
}

impl<R> FlattenLabels<R> {
    pub fn new(inner: R) -> Self {
        FlattenLabels { inner }
    }
}

/// The flattened form of `key`.
pub fn flatten(key: &Key) -> Key {
    let mut name = key.name().to_string();
    for label in key.labels() {
        name.push('.');
        name.extend(label.value().chars().map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        }));
    }
    Key::from_name(name)
}

impl<R: Recorder> Recorder for FlattenLabels<R> {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_counter(key, unit, description)
    }
    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_gauge(key, unit, description)
    }
    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.inner.describe_histogram(key, unit, description)
    }
    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.inner.register_counter(&flatten(key), metadata)
    }
    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.inner.register_gauge(&flatten(key), metadata)
    }
    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.inner.register_histogram(&flatten(key), metadata)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics::Label;

    #[test]
    fn labels_become_name_components_in_order() {
        let key = Key::from_parts(
            "tasks",
            vec![
                Label::new("queue", "re.ports:x"),
                Label::new("state", "ready"),
            ],
        );
        let flat = flatten(&key);
        assert_eq!(flat.name(), "tasks.re_ports_x.ready");
        assert_eq!(flat.labels().count(), 0);
        assert_eq!(flatten(&Key::from_name("raft.term")).name(), "raft.term");
    }
}
