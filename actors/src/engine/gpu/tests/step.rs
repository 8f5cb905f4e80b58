//! Packing a step: slots, block tables, sample rows and parameters, graph layouts and buckets.

use super::*;

fn greedy(banned: &[u32]) -> SampleRow<'_> {
    SampleRow {
        temperature: 0.0,
        top_p: 1.0,
        min_p: 0.0,
        top_k: 0,
        seed: 0x1_0000_0002,
        step: 5,
        banned,
    }
}

#[test]
fn a_step_packs_slots_tables_rows_and_parameters() {
    let banned = [7u32, 9];
    let items = [
        PlanItem {
            tokens: &[10, 11, 12],
            start: 0,
            blocks: &[4, 2],
            sample: None,
        },
        PlanItem {
            tokens: &[20],
            start: 5,
            blocks: &[1, 3, 8],
            sample: Some(greedy(&banned)),
        },
    ];
    let plan = StepPlan::build(&items, 4).expect("plan");
    assert_eq!(
        (plan.tokens, plan.seqs, plan.rows, plan.max_blocks),
        (4, 2, 1, 2)
    );
    assert_eq!(plan.max_context, 6);
    let d = &plan.data;
    let at = plan.at;
    assert_eq!(&d[at.ids..at.ids + 4], &[10, 11, 12, 20]);
    assert_eq!(&d[at.pos..at.pos + 4], &[0, 1, 2, 5]);
    // Position 5 of the second sequence: block index 1 → block 3, offset 1 → slot 13.
    assert_eq!(&d[at.slots..at.slots + 4], &[16, 17, 18, 13]);
    assert_eq!(&d[at.seq..at.seq + 4], &[0, 0, 0, 1]);
    assert_eq!(&d[at.tables..at.tables + 4], &[4, 0, 1, 3]);
    assert_eq!(d[at.rows], 3, "the logits row is the sequence's last token");
    let p = &d[at.params..at.params + SAMPLE_PARAMS];
    assert_eq!(p[4], 2);
    assert_eq!(p[5], 1);
    assert_eq!((p[6], p[7], p[8]), (5, 0, 2));
    assert_eq!(&d[at.banned..], &[7, 9]);
}

#[test]
fn a_decode_step_pads_to_its_graph_layout_and_keeps_every_value() {
    let banned = [7u32, 9];
    let row = greedy(&banned);
    let (b0, b1, b2) = ([3usize, 8], [5usize], [1usize, 2, 6]);
    let items = [
        PlanItem {
            tokens: &[11],
            start: 20,
            blocks: &b0,
            sample: Some(row.clone()),
        },
        PlanItem {
            tokens: &[12],
            start: 3,
            blocks: &b1,
            sample: Some(greedy(&[])),
        },
        PlanItem {
            tokens: &[13],
            start: 40,
            blocks: &b2,
            sample: Some(row.clone()),
        },
    ];
    let plan = StepPlan::build(&items, 16).expect("plan");
    assert!(plan.is_decode());
    let scratch = 99;
    let padded = plan.padded(4, 8, scratch).expect("padded");
    let (a, p) = (plan.at, padded.at);
    assert_eq!(
        (padded.tokens, padded.seqs, padded.rows, padded.max_blocks),
        (4, 4, 4, 8)
    );
    assert_eq!(
        p,
        super::batch::Offsets::layout(4, 4, 4, 8),
        "offsets depend on (batch, width) only"
    );
    for (from, to) in [
        (a.ids, p.ids),
        (a.pos, p.pos),
        (a.slots, p.slots),
        (a.seq, p.seq),
        (a.rows, p.rows),
    ] {
        assert_eq!(padded.data[to..to + 3], plan.data[from..from + 3]);
    }
    for s in 0..3 {
        let src = &plan.data[a.tables + s * plan.max_blocks..][..plan.max_blocks];
        assert_eq!(
            &padded.data[p.tables + s * 8..][..plan.max_blocks],
            src,
            "table row {s}"
        );
    }
    assert_eq!(
        padded.data[p.params..p.params + 3 * SAMPLE_PARAMS],
        plan.data[a.params..a.params + 3 * SAMPLE_PARAMS]
    );
    assert_eq!(
        padded.data[p.banned..],
        [7, 9, 7, 9],
        "banned ids keep their offsets"
    );
    // The padding row: token 0 at position 0, written to the scratch block, sampled greedily.
    assert_eq!((padded.data[p.ids + 3], padded.data[p.pos + 3]), (0, 0));
    assert_eq!(padded.data[p.slots + 3], (scratch * 16) as i32);
    assert_eq!(
        (padded.data[p.seq + 3], padded.data[p.tables + 3 * 8]),
        (3, scratch as i32)
    );
    assert_eq!(padded.data[p.rows + 3], 3);
    let params = &padded.data[p.params + 3 * SAMPLE_PARAMS..][..SAMPLE_PARAMS];
    assert_eq!(f32::from_bits(params[0] as u32), 0.0, "greedy");
    assert_eq!(params[8], 0, "nothing banned");
    // Too small a graph, too narrow a table, or a step that prefills: no padded layout.
    assert!(plan.padded(2, 8, scratch).is_none());
    assert!(plan.padded(4, 2, scratch).is_none());
    let prefill = [PlanItem {
        tokens: &[1, 2],
        start: 0,
        blocks: &b1,
        sample: Some(greedy(&[])),
    }];
    assert!(StepPlan::build(&prefill, 16)
        .expect("plan")
        .padded(4, 8, scratch)
        .is_none());
}

#[test]
fn decode_steps_map_to_graph_buckets() {
    use super::forward::graph_key;
    assert_eq!(graph_key(1, 1, 256, 512), Some((1, 4)));
    assert_eq!(graph_key(3, 5, 256, 512), Some((4, 8)));
    assert_eq!(graph_key(17, 9, 256, 512), Some((24, 16)));
    assert_eq!(graph_key(129, 300, 256, 512), Some((160, 512)));
    // Capped by the largest batch and the widest table.
    assert_eq!(graph_key(100, 3, 100, 512), Some((100, 4)));
    assert_eq!(graph_key(1, 300, 256, 300), Some((1, 300)));
    assert_eq!(graph_key(257, 3, 256, 512), None);
    assert_eq!(graph_key(0, 3, 256, 512), None);
    assert_eq!(graph_key(1, 600, 256, 512), None);
}

#[test]
fn a_step_without_enough_blocks_is_refused() {
    let items = [PlanItem {
        tokens: &[1, 2, 3, 4, 5],
        start: 0,
        blocks: &[0],
        sample: None,
    }];
    let e = StepPlan::build(&items, 4).unwrap_err();
    assert!(e.to_string().contains("needs 2 KV blocks"), "{e}");
}
