//! [`BatchQueue`]: the requests waiting for the model, cut into forward passes.
//!
//! Requests queue whole; a forward pass takes rows from the front while they fit its
//! [`BatchLimits`], so a request with many inputs spans several passes and several small requests
//! share one. Each request is answered once all its rows are computed, with its own rows in input
//! order. Rows are taken in arrival order (first come, first served): a big request ahead delays
//! the small ones behind it.

use std::collections::VecDeque;

use tokio::sync::oneshot;

use super::error::EmbedError;

/// Where a request's vectors (or its error) go.
pub type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, EmbedError>>;

/// One request waiting for, or partly through, the model.
struct Job {
    id: u64,
    /// Rows not yet taken into a batch, in input order.
    waiting: VecDeque<Vec<u32>>,
    /// Vectors computed so far, in input order.
    done: Vec<Vec<f32>>,
    /// Rows in total.
    rows: usize,
    /// Forward passes with rows of this request that panicked.
    faults: u32,
    reply: Reply,
}

/// The rows of one forward pass and which request each came from.
pub struct Batch {
    /// Token ids, one row per input.
    pub rows: Vec<Vec<u32>>,
    /// `(job id, rows)` in the order of `rows`.
    owners: Vec<(u64, usize)>,
}

/// How much one forward pass may take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchLimits {
    /// Rows (inputs) per pass.
    pub max_rows: usize,
    /// Rows × the longest row's tokens: every row is padded to the longest, so this bounds the
    /// pass's work and memory (attention scores grow with rows × longest²) and keeps one long
    /// input from padding many short ones. A row longer than this still goes, alone.
    pub max_tokens: usize,
}

/// Requests waiting for the model.
#[derive(Default)]
pub struct BatchQueue {
    jobs: VecDeque<Job>,
    next_id: u64,
}

impl BatchQueue {
    /// Queues a request. An empty request is answered at once.
    pub fn push(&mut self, rows: Vec<Vec<u32>>, reply: Reply) {
        if rows.is_empty() {
            let _ = reply.send(Ok(Vec::new()));
            return;
        }
        self.next_id += 1;
        self.jobs.push_back(Job {
            id: self.next_id,
            rows: rows.len(),
            done: Vec::with_capacity(rows.len()),
            faults: 0,
            waiting: rows.into(),
            reply,
        });
    }

    /// Whether any request is waiting.
    pub fn is_empty(&self) -> bool {
        self.jobs.is_empty()
    }

    /// Requests waiting (including ones partly computed).
    pub fn len(&self) -> usize {
        self.jobs.len()
    }

    /// Rows from the front for the next forward pass, as many as fit `limits`; None when nothing
    /// waits. Requests whose caller has gone (client hung up) are dropped instead of computed.
    pub fn next_batch(&mut self, limits: BatchLimits) -> Option<Batch> {
        self.jobs.retain(|job| !job.reply.is_closed());
        let mut batch = Batch {
            rows: Vec::new(),
            owners: Vec::new(),
        };
        let mut longest = 0;
        'jobs: for job in self.jobs.iter_mut() {
            let mut taken = 0;
            while let Some(len) = job.waiting.front().map(Vec::len) {
                let rows = batch.rows.len() + 1;
                let fits = rows <= limits.max_rows.max(1)
                    && (rows == 1 || rows * longest.max(len) <= limits.max_tokens);
                if !fits {
                    if taken > 0 {
                        batch.owners.push((job.id, taken));
                    }
                    break 'jobs;
                }
                if let Some(row) = job.waiting.pop_front() {
                    longest = longest.max(len);
                    batch.rows.push(row);
                    taken += 1;
                }
            }
            if taken > 0 {
                batch.owners.push((job.id, taken));
            }
        }
        (!batch.rows.is_empty()).then_some(batch)
    }

    /// Hands `batch`'s vectors (one per row, in order) to their requests; answers those complete.
    pub fn complete(&mut self, batch: Batch, vectors: Vec<Vec<f32>>) {
        if vectors.len() != batch.rows.len() {
            let error = EmbedError::Model(format!(
                "the model returned {} vectors for {} rows",
                vectors.len(),
                batch.rows.len()
            ));
            return self.fail(batch, error);
        }
        let mut vectors = vectors.into_iter();
        for (id, count) in batch.owners {
            let Some(job) = self.jobs.iter_mut().find(|job| job.id == id) else {
                continue;
            };
            job.done.extend(vectors.by_ref().take(count));
        }
        while let Some(position) = self.jobs.iter().position(|job| job.done.len() == job.rows) {
            if let Some(job) = self.jobs.remove(position) {
                let _ = job.reply.send(Ok(job.done));
            }
        }
    }

    /// A forward pass over `batch` panicked: its rows go back to the front of their requests, to be
    /// computed again, except for requests that were already in `retries` failed passes, which are
    /// answered with `error`. The model is a pure function of the rows, so computing them again gives
    /// what the failed pass would have; the bound stops an input that panics the model every time.
    pub fn retry(&mut self, batch: Batch, retries: u32, error: EmbedError) {
        let mut rows = batch.rows.into_iter();
        for (id, count) in batch.owners {
            let taken: Vec<Vec<u32>> = rows.by_ref().take(count).collect();
            let Some(position) = self.jobs.iter().position(|job| job.id == id) else {
                continue;
            };
            let job = &mut self.jobs[position];
            job.faults += 1;
            if job.faults > retries {
                if let Some(job) = self.jobs.remove(position) {
                    let _ = job.reply.send(Err(error.clone()));
                }
                continue;
            }
            for row in taken.into_iter().rev() {
                job.waiting.push_front(row);
            }
        }
    }

    /// Answers every request with rows in `batch` with `error` (their other rows are dropped).
    pub fn fail(&mut self, batch: Batch, error: EmbedError) {
        for (id, _) in batch.owners {
            if let Some(position) = self.jobs.iter().position(|job| job.id == id) {
                if let Some(job) = self.jobs.remove(position) {
                    let _ = job.reply.send(Err(error.clone()));
                }
            }
        }
    }

    /// Answers every waiting request with `error`.
    pub fn fail_all(&mut self, error: EmbedError) {
        for job in self.jobs.drain(..) {
            let _ = job.reply.send(Err(error.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Receiver = oneshot::Receiver<Result<Vec<Vec<f32>>, EmbedError>>;

    fn request(queue: &mut BatchQueue, rows: &[u32]) -> Receiver {
        let (tx, rx) = oneshot::channel();
        queue.push(rows.iter().map(|&r| vec![r]).collect(), tx);
        rx
    }

    fn rows(max_rows: usize) -> BatchLimits {
        BatchLimits {
            max_rows,
            max_tokens: usize::MAX,
        }
    }

    /// A fake model: each row's vector is its first token id.
    fn run(queue: &mut BatchQueue, limits: BatchLimits) -> Vec<usize> {
        let mut sizes = Vec::new();
        while let Some(batch) = queue.next_batch(limits) {
            sizes.push(batch.rows.len());
            let vectors = batch.rows.iter().map(|r| vec![r[0] as f32]).collect();
            queue.complete(batch, vectors);
        }
        sizes
    }

    fn answer(rx: &mut Receiver) -> Result<Vec<f32>, EmbedError> {
        rx.try_recv()
            .expect("answered")
            .map(|vectors| vectors.into_iter().map(|v| v[0]).collect())
    }

    #[test]
    fn small_requests_share_a_pass_and_get_their_own_rows() {
        let mut queue = BatchQueue::default();
        let mut a = request(&mut queue, &[1, 2]);
        let mut b = request(&mut queue, &[3]);
        let mut c = request(&mut queue, &[4, 5, 6]);
        assert_eq!(run(&mut queue, rows(32)), vec![6]);
        assert_eq!(answer(&mut a), Ok(vec![1.0, 2.0]));
        assert_eq!(answer(&mut b), Ok(vec![3.0]));
        assert_eq!(answer(&mut c), Ok(vec![4.0, 5.0, 6.0]));
        assert!(queue.is_empty());
    }

    #[test]
    fn a_big_request_spans_passes_capped_at_max_rows() {
        let mut queue = BatchQueue::default();
        let ids: Vec<u32> = (0..10).collect();
        let mut big = request(&mut queue, &ids);
        let mut small = request(&mut queue, &[99]);
        assert_eq!(run(&mut queue, rows(4)), vec![4, 4, 3]);
        assert_eq!(
            answer(&mut big),
            Ok((0..10).map(|i| i as f32).collect::<Vec<_>>())
        );
        assert_eq!(answer(&mut small), Ok(vec![99.0]));
    }

    #[test]
    fn the_token_budget_keeps_a_long_row_from_padding_many_short_ones() {
        let mut queue = BatchQueue::default();
        let (tx, mut long) = oneshot::channel();
        queue.push(vec![vec![7; 100]], tx);
        let shorts: Vec<Receiver> = (0..6).map(|i| request(&mut queue, &[i])).collect();
        let limits = BatchLimits {
            max_rows: 32,
            max_tokens: 300,
        };
        // 3 rows × 100 tokens fit; then 4 one-token rows; a row over the budget alone still goes.
        assert_eq!(run(&mut queue, limits), vec![3, 4]);
        assert_eq!(answer(&mut long), Ok(vec![7.0]));
        for (i, mut rx) in shorts.into_iter().enumerate() {
            assert_eq!(answer(&mut rx), Ok(vec![i as f32]));
        }
        let (tx, mut huge) = oneshot::channel();
        queue.push(vec![vec![1; 1000], vec![2; 1000]], tx);
        assert_eq!(run(&mut queue, limits), vec![1, 1]);
        assert_eq!(answer(&mut huge), Ok(vec![1.0, 2.0]));
    }

    #[test]
    fn a_failed_pass_fails_only_its_requests() {
        let mut queue = BatchQueue::default();
        let mut first = request(&mut queue, &[1, 2, 3]);
        let mut second = request(&mut queue, &[4]);
        let batch = queue.next_batch(rows(2)).expect("rows");
        queue.fail(batch, EmbedError::Restarted);
        assert_eq!(answer(&mut first), Err(EmbedError::Restarted));
        assert_eq!(run(&mut queue, rows(2)), vec![1]);
        assert_eq!(answer(&mut second), Ok(vec![4.0]));
    }

    #[test]
    fn a_panicked_pass_is_computed_again_in_order_until_its_requests_run_out_of_retries() {
        let mut queue = BatchQueue::default();
        let mut spanning = request(&mut queue, &[1, 2, 3]);
        let mut later = request(&mut queue, &[4]);
        // The pass over rows 1 and 2 panics: they go back in front of row 3, in order.
        let batch = queue.next_batch(rows(2)).expect("rows");
        queue.retry(batch, 1, EmbedError::Restarted);
        assert_eq!(run(&mut queue, rows(2)), vec![2, 2]);
        assert_eq!(answer(&mut spanning), Ok(vec![1.0, 2.0, 3.0]));
        assert_eq!(answer(&mut later), Ok(vec![4.0]));
        // A request whose rows panic every pass fails after its retries; the others are kept.
        let mut poison = request(&mut queue, &[5]);
        let mut bystander = request(&mut queue, &[6]);
        for _ in 0..2 {
            let batch = queue.next_batch(rows(1)).expect("rows");
            assert_eq!(batch.rows, vec![vec![5]]);
            queue.retry(batch, 1, EmbedError::Restarted);
        }
        assert_eq!(answer(&mut poison), Err(EmbedError::Restarted));
        assert_eq!(run(&mut queue, rows(1)), vec![1]);
        assert_eq!(answer(&mut bystander), Ok(vec![6.0]));
    }

    #[test]
    fn requests_whose_caller_left_are_not_computed() {
        let mut queue = BatchQueue::default();
        drop(request(&mut queue, &[1, 2]));
        let mut kept = request(&mut queue, &[3]);
        assert_eq!(run(&mut queue, rows(32)), vec![1]);
        assert_eq!(answer(&mut kept), Ok(vec![3.0]));
    }

    #[test]
    fn a_wrong_vector_count_is_an_error_not_a_mixup() {
        let mut queue = BatchQueue::default();
        let mut rx = request(&mut queue, &[1, 2]);
        let batch = queue.next_batch(rows(8)).expect("rows");
        queue.complete(batch, vec![vec![1.0]]);
        assert!(matches!(answer(&mut rx), Err(EmbedError::Model(_))));
        assert!(queue.is_empty());
    }

    #[test]
    fn fail_all_answers_everyone() {
        let mut queue = BatchQueue::default();
        let mut a = request(&mut queue, &[1]);
        let mut b = request(&mut queue, &[2]);
        queue.fail_all(EmbedError::Stopped);
        assert_eq!(answer(&mut a), Err(EmbedError::Stopped));
        assert_eq!(answer(&mut b), Err(EmbedError::Stopped));
        assert_eq!(queue.len(), 0);
    }
}
