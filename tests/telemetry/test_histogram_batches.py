"""The duration histograms take a sample with one append and sort samples into buckets in batches: every read
(points, the Prometheus text, an OTLP export) sees every sample recorded before it, samples from many threads are
all counted, and the cap on label sets holds."""

from __future__ import annotations

import threading

from prometheus_client.parser import text_string_to_metric_families

from meshlib.telemetry.metrics import FLUSH_AT, MAX_SERIES, Histogram, MeshMetrics, render_prometheus


def _counts(histogram: Histogram) -> dict[tuple[tuple[str, str], ...], tuple[int, list[int], float]]:
    return {
        tuple(sorted(p.attributes.items())): (p.count, p.bucket_counts, round(p.sum, 9)) for p in histogram.points()
    }


def test_a_read_sees_every_sample_recorded_before_it_whatever_the_batch() -> None:
    metrics = MeshMetrics("front")
    labels = metrics.client_labels("echo", "default", "POST", "2xx", "success")
    histogram = metrics.client_duration
    for n in (1, FLUSH_AT - 1, FLUSH_AT, FLUSH_AT + 1, 3 * FLUSH_AT + 7):
        before = sum(c for c, _, _ in _counts(histogram).values())
        for _ in range(n):
            histogram.record(0.0007, labels)  # in the (0.0005, 0.001] bucket
        (count, buckets, total) = _counts(histogram)[tuple(sorted(labels))]
        assert count == before + n
        assert buckets[1] == count and sum(buckets) == count
        assert abs(total - count * 0.0007) < 1e-9
    histogram.record(0.2, labels)  # not yet sorted into a batch: the Prometheus text shows it all the same
    families = {f.name: f for f in text_string_to_metric_families(render_prometheus(metrics))}
    samples = families["http_client_request_duration_seconds"].samples
    assert [s.value for s in samples if s.name.endswith("_count")] == [count + 1]


def test_samples_from_many_threads_are_all_counted() -> None:
    histogram = Histogram("h", "s", "test")
    labels = ((("k", "a"),), (("k", "b"),))
    per_thread = 5 * FLUSH_AT + 3

    def record(which: int) -> None:
        for i in range(per_thread):
            histogram.record(0.001 * (i % 7), labels[which % 2])

    threads = [threading.Thread(target=record, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = _counts(histogram)
    assert {key: value[0] for key, value in counts.items()} == {labels[0]: 4 * per_thread, labels[1]: 4 * per_thread}


def test_the_cap_on_label_sets_holds_when_samples_come_in_batches() -> None:
    histogram = Histogram("h", "s", "test")
    for n in range(MAX_SERIES + 50):
        histogram.record(0.001, (("n", str(n)),))
    points = histogram.points()
    assert len(points) == MAX_SERIES
    assert all(p.count == 1 for p in points)
