//! Registers the frontend's metrics in its own registry under the configured prefix.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

use super::MetricsError;

/// Registers metrics under one prefix into one registry, turning failures into [`MetricsError`].
pub(super) struct Registrar<'a> {
    pub(super) registry: &'a Registry,
    pub(super) prefix: &'a str,
}

impl Registrar<'_> {
    pub(super) fn name(&self, name: &str) -> String {
        format!("{}_{name}", self.prefix)
    }

    pub(super) fn register<C: prometheus::core::Collector + Clone + 'static>(
        &self,
        name: &str,
        build: prometheus::Result<C>,
    ) -> Result<C, MetricsError> {
        let register_error = |source| MetricsError::Register {
            name: self.name(name),
            source,
        };
        let collector = build.map_err(register_error)?;
        self.registry
            .register(Box::new(collector.clone()))
            .map_err(register_error)?;
        Ok(collector)
    }

    pub(super) fn counter_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, MetricsError> {
        self.register(
            name,
            IntCounterVec::new(Opts::new(self.name(name), help), labels),
        )
    }

    pub(super) fn gauge_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, MetricsError> {
        self.register(
            name,
            IntGaugeVec::new(Opts::new(self.name(name), help), labels),
        )
    }

    pub(super) fn gauge(&self, name: &str, help: &str) -> Result<IntGauge, MetricsError> {
        self.register(name, IntGauge::with_opts(Opts::new(self.name(name), help)))
    }

    pub(super) fn histogram_vec(
        &self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: Vec<f64>,
    ) -> Result<HistogramVec, MetricsError> {
        let opts = HistogramOpts::new(self.name(name), help).buckets(buckets);
        self.register(name, HistogramVec::new(opts, labels))
    }
}
