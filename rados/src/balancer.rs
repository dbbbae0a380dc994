//! The upmap balancer: the `pg_upmap_items` exceptions that even out PGs per OSD.
//!
//! straw2 decides each PG on its own, so an OSD's PG count is binomial: at 128 PGs of size 3 over 20 OSDs
//! its standard deviation is 21% of the mean, and no hash can do better. Ceph's answer is its manager's
//! upmap balancer (`ceph balancer mode upmap`, `OSDMap::calc_pg_upmaps`): it keeps the hash and records,
//! per PG, a few `(from, to)` replacements in the map. [`balance`] is ours: a pure function of a map (and,
//! as a hint, the map before it) that returns the upmap changes bringing every pool's PGs per OSD as close
//! to the OSDs' weight shares as whole PGs and the host failure domain allow.
//!
//! What it does, per pool, in pool id order:
//! 1. Keeps each existing item that still takes effect and drops those that do not (an OSD gone, out or of
//!    weight 0, a `from` straw2 no longer picks, a host clash): Ceph's `clean_pg_upmaps`.
//! 2. Counts the pool's replicas on each eligible OSD (in, weight > 0; up or down does not matter: a down
//!    OSD that is still in keeps its PGs, degraded, and must not cause data movement).
//! 3. With a previous map: puts back every replica that straw2 (or a dropped item) moved and that can go
//!    back (its old OSD still eligible, the PG's hosts still distinct), whatever that does to the balance.
//!    What still differs from the previous placement is then only what the change forced: the replicas of
//!    an OSD that left, or that a new OSD must take. Step 4 starts from the previous, balanced placement.
//! 4. Repeatedly moves one replica from an OSD above its share to one below it, while the move lowers the
//!    sum of squared deviations from the shares. With `c` the count, `S` the pool's replicas, `w` the OSD's
//!    weight and `W` the sum, the scaled deviation `D = c W - S w` is an integer, a move from `o` to `u`
//!    changes the sum of `D^2` by `2 W (D_u - D_o + W)`, so it helps exactly when `D_o - D_u > W`. When no
//!    such move is possible every count is the floor or the ceiling of its share (the deviations sum to
//!    zero and differ by less than one share unit); the failure domain can stop it earlier.
//! 5. Picks, among those moves, the one that copies least: in a PG whose members differ from the previous
//!    map's, a replica an OSD only just received can go back to an OSD that had it (a "restore", one copy
//!    fewer; also taken when it leaves the sum of squares equal) or on to another OSD (a "redirect": no
//!    extra copy, the copy was due anyway). Only then a replica that was in place moves, from the most
//!    overfull OSD with a valid move to the most underfull one, preferring a PG where that undoes an item
//!    (fewer items). A move is valid when the target is eligible, not in the PG, and keeps the PG's
//!    distinct hosts ([`Placement::raw_osds`]' rule, checked by re-applying the PG's items).
//!
//! The loop ends: step 3 lowers the number of replicas away from their previous OSD, and every move of
//! step 4 lowers the sum of squares, or keeps it and lowers that number (a restore); the pair of them
//! falls in lexicographic order and neither is negative.
//!
//! In the maps the tests try (one OSD per host, equal weights, 3 to 20 OSDs, 128 PGs), adding an OSD copies
//! replicas only onto it, and removing one copies just the replicas it held: the least any placement can
//! move. With 2 to 4 OSDs per host the copies stay within 1.5/N of the replicas (1.33/N at worst).
//!
//! A move edits the PG's items minimally: an item that put the replica on the overfull OSD is retargeted,
//! or removed if it would map an OSD back to itself; otherwise one item is appended.
//!
//! Integers only, ordered collections only, ties broken by OSD id and PG seed: the same input gives the
//! same output on every platform. Work is bounded by [`BALANCE_MOVES_MAX`] moves per call, each a scan of
//! the PGs of one OSD per candidate pair. 128 PGs over 20 OSDs take about 0.3 ms in the workspace's dev
//! profile (opt-level 1) and under 2 ms at opt-level 0, placement included.

use std::collections::{BTreeMap, BTreeSet};

use crate::ids::{OsdId, PgId, PoolId};
use crate::map::{valid_upmap_items, Incremental, OsdMap, Pool, PG_UPMAPS_MAX};
use crate::placement::Placement;

/// Most replica moves one [`balance`] call makes, over all pools. A cluster that needs more (a new pool of
/// tens of thousands of PGs) is balanced over several epochs: the monitor runs the balancer again on every
/// placement change.
pub const BALANCE_MOVES_MAX: usize = 4096;

/// Upmap changes to fold into an incremental, as [`Incremental::new_pg_upmap_items`] and
/// [`Incremental::old_pg_upmap_items`] would carry them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UpmapChanges {
    /// PGs whose items are set or replaced.
    pub set: BTreeMap<PgId, Vec<(OsdId, OsdId)>>,
    /// PGs whose items are removed.
    pub removed: BTreeSet<PgId>,
}

impl UpmapChanges {
    /// Whether there is nothing to change.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.removed.is_empty()
    }

    /// Folds changes computed on the map that `inc` produces from `base` into `inc`, so that `base` plus
    /// the new `inc` gives that map with these changes.
    pub fn fold_into(&self, inc: &mut Incremental, base: &OsdMap) {
        for &pg in &self.removed {
            // The PG has items after `inc`: set by `inc`, or kept from `base`.
            inc.new_pg_upmap_items.remove(&pg);
            if base.pg_upmap_items.contains_key(&pg) {
                inc.old_pg_upmap_items.insert(pg);
            }
        }
        for (&pg, items) in &self.set {
            // Setting replaces whatever `base` had; removing first as well is not allowed.
            inc.old_pg_upmap_items.remove(&pg);
            inc.new_pg_upmap_items.insert(pg, items.clone());
        }
    }

    /// Applies these changes to `map` directly (the same result as folding them into the incremental that
    /// produced `map`).
    pub fn apply_to(&self, map: &mut OsdMap) {
        for pg in &self.removed {
            map.pg_upmap_items.remove(pg);
        }
        for (&pg, items) in &self.set {
            map.pg_upmap_items.insert(pg, items.clone());
        }
    }
}

/// The upmap changes that balance every pool of `map`; see the module doc. `previous`, the map before the
/// change being balanced, steers the moves towards keeping data where it was (steps 3 and 5); pass `None`
/// when there is no such map. Either way the result is balanced: `balance(&result, None)` is empty, unless
/// [`BALANCE_MOVES_MAX`] or [`PG_UPMAPS_MAX`] stopped it.
pub fn balance(map: &OsdMap, previous: Option<&OsdMap>) -> UpmapChanges {
    let placement = Placement::new(map);
    let previous_placement = previous.map(Placement::new);
    let mut result = map.pg_upmap_items.clone();
    let mut moves_left = BALANCE_MOVES_MAX;
    for pool in map.pools.values() {
        let before = previous_placement.as_ref().and_then(|p| previous_sets(p, pool));
        balance_pool(&placement, pool, before.as_deref(), &mut result, &mut moves_left);
    }

    let mut changes = UpmapChanges::default();
    for (pg, items) in &map.pg_upmap_items {
        match result.get(pg) {
            None => {
                changes.removed.insert(*pg);
            }
            Some(new) if new != items => {
                changes.set.insert(*pg, new.clone());
            }
            Some(_) => {}
        }
    }
    for (pg, items) in &result {
        if !map.pg_upmap_items.contains_key(pg) {
            changes.set.insert(*pg, items.clone());
        }
    }
    // What the map will check: the monitor must never emit an incremental it cannot apply.
    assert!(result.len() <= PG_UPMAPS_MAX);
    assert!(result.iter().all(|(pg, items)| map.pg_exists(*pg) && valid_upmap_items(items)));
    changes
}

/// The pool's PG sets in the previous map, by seed, if the pool existed there (`None` past its old
/// `pg_num`).
fn previous_sets(placement: &Placement<'_>, pool: &Pool) -> Option<Vec<Option<Vec<OsdId>>>> {
    let old = placement.map().pools.get(&pool.id)?;
    Some(
        (0..pool.pg_num)
            .map(|seed| {
                (seed < old.pg_num).then(|| placement.raw_osds(PgId::new(pool.id, seed)).unwrap_or_default())
            })
            .collect(),
    )
}

/// One PG during balancing.
struct PgState {
    straw2: Vec<OsdId>,
    items: Vec<(OsdId, OsdId)>,
    set: Vec<OsdId>,
}

/// The items of `items` that take effect on `straw2`, and the set they produce.
fn effective(placement: &Placement<'_>, straw2: &[OsdId], items: &[(OsdId, OsdId)]) -> PgState {
    let mut set = straw2.to_vec();
    let mut kept = Vec::new();
    placement.apply_upmap_items(&mut set, items, |item| kept.push(item));
    PgState { straw2: straw2.to_vec(), items: kept, set }
}

/// One replica move: in PG `seed`, the OSD at `index` of the set gives its replica to `to`; `items` are
/// the PG's upmap items afterwards.
struct Move {
    seed: u32,
    index: usize,
    to: OsdId,
    items: Vec<(OsdId, OsdId)>,
}

/// Per-OSD bookkeeping of one pool.
struct OsdLoad {
    weight: u64,
    count: u64,
    /// Seeds of the PGs that hold a replica here.
    pgs: BTreeSet<u32>,
}

fn balance_pool(
    placement: &Placement<'_>,
    pool: &Pool,
    before: Option<&[Option<Vec<OsdId>>]>,
    result: &mut BTreeMap<PgId, Vec<(OsdId, OsdId)>>,
    moves_left: &mut usize,
) {
    let map = placement.map();
    let mut loads: BTreeMap<OsdId, OsdLoad> = map
        .osds
        .iter()
        .filter(|(_, info)| info.in_ && info.weight > 0)
        .map(|(&osd, info)| (osd, OsdLoad { weight: info.weight.into(), count: 0, pgs: BTreeSet::new() }))
        .collect();
    if loads.is_empty() {
        return;
    }

    // Steps 1 and 2: keep the items that take effect, count.
    let mut pgs: Vec<PgState> = Vec::with_capacity(pool.pg_num as usize);
    for seed in 0..pool.pg_num {
        let pg = PgId::new(pool.id, seed);
        // The pool is the map's and the seed below its pg_num, so placement cannot fail.
        let straw2 = placement.straw2_osds(pg).expect("PG of the map's own pool");
        let state = effective(placement, &straw2, result.get(&pg).map_or(&[], Vec::as_slice));
        if state.items.is_empty() {
            result.remove(&pg);
        } else {
            result.insert(pg, state.items.clone());
        }
        for osd in &state.set {
            // Every OSD of a set is eligible: straw2 picks only eligible OSDs, upmap only eligible targets.
            let load = loads.get_mut(osd).expect("placed OSD is eligible");
            load.count += 1;
            load.pgs.insert(seed);
        }
        pgs.push(state);
    }

    let total_weight: u64 = loads.values().map(|l| l.weight).sum();
    let slots: u64 = loads.values().map(|l| l.count).sum();
    // Fits: counts are at most 2^16 PGs x 10 replicas, weights a sum of at most 2^14 u32s.
    let deviation = |l: &OsdLoad| {
        i128::from(l.count) * i128::from(total_weight) - i128::from(slots) * i128::from(l.weight)
    };
    let unit = i128::from(total_weight);
    let changed: BTreeSet<u32> = match before {
        Some(before) => (0..pool.pg_num)
            .filter(|&seed| {
                before[seed as usize].as_ref().is_some_and(|old| !same_members(&pgs[seed as usize].set, old))
            })
            .collect(),
        None => BTreeSet::new(),
    };

    let mut pool_state = PoolState { pool: pool.id, pgs, loads, changed };

    // Step 3 (with a previous map): put every replica that straw2 moved, and that may go back, back where
    // it was, whatever that does to the balance. What remains different is only what the change forced
    // (replicas of an OSD that left, or the items of a pool that changed); the balancing below then starts
    // from the previous, balanced, placement and moves as little as it must.
    if let Some(before) = before {
        let seeds: Vec<u32> = pool_state.changed.iter().copied().collect();
        for seed in seeds {
            let Some(old) = &before[seed as usize] else { continue };
            while *moves_left > 0 {
                let state = &pool_state.pgs[seed as usize];
                let restore = state.set.iter().enumerate().filter(|(_, osd)| !old.contains(osd)).find_map(
                    |(index, _)| {
                        old.iter().filter(|osd| !state.set.contains(osd)).find_map(|&to| {
                            let items = edit_items(placement, state, index, to, result.len())?;
                            Some(Move { seed, index, to, items })
                        })
                    },
                );
                let Some(restore) = restore else { break };
                pool_state.apply(restore, before, result);
                *moves_left -= 1;
            }
        }
    }

    while *moves_left > 0 {
        // Most overfull first, most underfull last; ties by id for determinism.
        let mut order: Vec<(i128, OsdId)> =
            pool_state.loads.iter().map(|(&osd, l)| (deviation(l), osd)).collect();
        order.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let (pgs, loads, changed) = (&pool_state.pgs, &pool_state.loads, &pool_state.changed);
        let chosen = cheap_move(placement, pgs, before, changed, &order, unit, result.len())
            .or_else(|| any_move(placement, pool, pgs, loads, &order, unit, result.len()));
        let Some(chosen) = chosen else { break };
        pool_state.apply(chosen, before.unwrap_or(&[]), result);
        *moves_left -= 1;
    }
}

/// The balancing state of one pool.
struct PoolState {
    pool: PoolId,
    pgs: Vec<PgState>,
    loads: BTreeMap<OsdId, OsdLoad>,
    /// Seeds of the PGs whose members differ from the previous map's: where cheap moves are.
    changed: BTreeSet<u32>,
}

impl PoolState {
    /// Carries out `mv`, keeping the per-OSD counts, the result's items and `changed` up to date. `before`
    /// is empty without a previous map.
    fn apply(
        &mut self,
        mv: Move,
        before: &[Option<Vec<OsdId>>],
        result: &mut BTreeMap<PgId, Vec<(OsdId, OsdId)>>,
    ) {
        let Move { seed, index, to, items } = mv;
        let state = &mut self.pgs[seed as usize];
        let from = state.set[index];
        state.set[index] = to;
        state.items = items;
        let pg = PgId::new(self.pool, seed);
        if state.items.is_empty() {
            result.remove(&pg);
        } else {
            result.insert(pg, state.items.clone());
        }
        let out = self.loads.get_mut(&from).expect("current holder is eligible");
        out.count -= 1;
        assert!(out.pgs.remove(&seed));
        let into = self.loads.get_mut(&to).expect("target is eligible");
        into.count += 1;
        assert!(into.pgs.insert(seed));
        if let Some(Some(old)) = before.get(seed as usize) {
            if same_members(&state.set, old) {
                self.changed.remove(&seed);
            } else {
                self.changed.insert(seed);
            }
        }
    }
}

/// The cheapest move in data copied, among PGs whose set differs from the previous map's: moving the
/// replica that OSD `o` holds in such a PG to `u` changes the replicas to copy by
/// `[u not in previous set] - [o not in previous set]`. So a replica `o` only just received can go back to
/// an OSD that had it (cost -1, a "restore") or on to any other OSD (cost 0, a "redirect": the copy was
/// needed anyway). Restores are taken even when they leave the squared deviation equal (`gain == unit`),
/// redirects only when they lower it. Lowest cost first, then highest gain, then lowest seed, slot, id.
fn cheap_move(
    placement: &Placement<'_>,
    pgs: &[PgState],
    before: Option<&[Option<Vec<OsdId>>]>,
    changed: &BTreeSet<u32>,
    order: &[(i128, OsdId)],
    unit: i128,
    upmapped: usize,
) -> Option<Move> {
    let before = before?;
    let dev: BTreeMap<OsdId, i128> = order.iter().map(|&(d, osd)| (osd, d)).collect();
    // (cost, -gain) to minimise, then the move.
    let mut best: Option<((i8, i128), Move)> = None;
    for &seed in changed {
        let state = &pgs[seed as usize];
        let Some(old) = &before[seed as usize] else { continue };
        for (index, &from) in state.set.iter().enumerate() {
            if old.contains(&from) {
                continue;
            }
            let d_from = dev[&from];
            // Targets: restores first, then everything else in ascending deviation.
            let restores = old.iter().filter(|osd| !state.set.contains(osd)).map(|&osd| (-1, osd));
            let redirects = order
                .iter()
                .rev()
                .map(|&(_, osd)| osd)
                .filter(|osd| !old.contains(osd) && !state.set.contains(osd))
                .map(|osd| (0, osd));
            for (cost, to) in restores.chain(redirects) {
                let Some(&d_to) = dev.get(&to) else { continue };
                let gain = d_from - d_to;
                let worth = if cost < 0 { gain >= unit } else { gain > unit };
                if !worth {
                    if cost == 0 {
                        // Redirect targets come in ascending deviation: the rest gain even less.
                        break;
                    }
                    continue;
                }
                let key = (cost, -gain);
                if best.as_ref().is_some_and(|b| b.0 <= key) {
                    if cost == 0 {
                        // Later redirect targets gain no more: none of them can win either.
                        break;
                    }
                    continue;
                }
                if let Some(items) = edit_items(placement, state, index, to, upmapped) {
                    best = Some((key, Move { seed, index, to, items }));
                }
            }
        }
    }
    best.map(|(_, chosen)| chosen)
}

fn same_members(a: &[OsdId], b: &[OsdId]) -> bool {
    a.len() == b.len() && a.iter().all(|osd| b.contains(osd))
}

/// The first valid move from the most overfull OSD that has one to the most underfull OSD that takes it,
/// among pairs whose move lowers the squared deviation.
fn any_move(
    placement: &Placement<'_>,
    pool: &Pool,
    pgs: &[PgState],
    loads: &BTreeMap<OsdId, OsdLoad>,
    order: &[(i128, OsdId)],
    unit: i128,
    upmapped: usize,
) -> Option<Move> {
    for &(d_from, from) in order {
        for &(d_to, to) in order.iter().rev() {
            if d_from - d_to <= unit {
                // `order` is descending, so every later target is even less underfull.
                break;
            }
            // First a PG where the move undoes an item (back to straw2's choice: fewer items), then any.
            for undo in [true, false] {
                for &seed in &loads[&from].pgs {
                    let state = &pgs[seed as usize];
                    if undo && !state.items.contains(&(to, from)) {
                        continue;
                    }
                    let Some(index) = state.set.iter().position(|&osd| osd == from) else {
                        unreachable!("PG {}.{seed:x} listed under {from} holds it", pool.id)
                    };
                    if let Some(items) = edit_items(placement, state, index, to, upmapped) {
                        return Some(Move { seed, index, to, items });
                    }
                }
            }
        }
    }
    None
}

/// The PG's items after moving `set[index]` to `to`, if that is valid: re-applying them to the straw2 set
/// gives exactly the intended set, and a PG without items gets one only while the map has room.
fn edit_items(
    placement: &Placement<'_>,
    state: &PgState,
    index: usize,
    to: OsdId,
    upmapped: usize,
) -> Option<Vec<(OsdId, OsdId)>> {
    let from = state.set[index];
    if !placement.upmap_target_ok(&state.set, index, to) {
        return None;
    }
    let mut items = state.items.clone();
    match items.iter().position(|&(_, target)| target == from) {
        Some(i) if items[i].0 == to => {
            items.remove(i);
        }
        Some(i) => items[i].1 = to,
        None => {
            if items.iter().any(|&(source, _)| source == to) {
                // `to` was mapped away from this PG; mapping it back in through another item would make a
                // chain. Other PGs will do.
                return None;
            }
            if state.items.is_empty() && upmapped >= PG_UPMAPS_MAX {
                return None;
            }
            items.push((from, to));
        }
    }
    // A map may hold items the balancer did not write (chains such as a->b, b->c); retargeting one of
    // those could name an OSD twice, which the map refuses.
    if !items.is_empty() && !valid_upmap_items(&items) {
        return None;
    }
    let mut intended = state.set.clone();
    intended[index] = to;
    let check = effective(placement, &state.straw2, &items);
    (check.set == intended && check.items == items).then_some(items)
}

/// Per-pool replica counts of every eligible OSD of `map` under [`Placement::raw_osds`] (OSDs holding
/// none included with 0): what the balancer evens out, for tests and tools.
pub fn pool_counts(map: &OsdMap, pool: PoolId) -> BTreeMap<OsdId, u64> {
    let mut counts: BTreeMap<OsdId, u64> =
        map.osds.iter().filter(|(_, info)| info.in_ && info.weight > 0).map(|(&osd, _)| (osd, 0)).collect();
    let Some(p) = map.pools.get(&pool) else { return counts };
    let placement = Placement::new(map);
    for seed in 0..p.pg_num {
        for osd in placement.raw_osds(PgId::new(pool, seed)).unwrap_or_default() {
            *counts.entry(osd).or_insert(0) += 1;
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::ids::Fsid;
    use crate::map::{OsdInfo, WEIGHT_ONE};
    use crate::placement::tests::{arb_cluster, osd_info};

    use proptest::prelude::*;

    const PG_NUM: u32 = 128;
    const SIZE: u8 = 3;
    /// Seeded maps per layout and OSD count; the seed picks the pool id (hence every straw2 draw), the
    /// host names and the weights.
    const SEEDS: u64 = 6;

    use messenger::util::splitmix64 as splitmix;

    /// A map of OSDs `(host, weight)` with ids 0.., one pool of 128 PGs of size 3.
    fn cluster(seed: u64, osds: &[(String, u32)]) -> OsdMap {
        let mut map = OsdMap::new(Fsid([3; 16]));
        for (i, (host, weight)) in osds.iter().enumerate() {
            map.osds.insert(OsdId(i as u32), osd_info(host, *weight));
        }
        let id = PoolId((splitmix(seed) >> 40) as u32 + 1);
        let pool = Pool { id, name: "rbd".into(), size: SIZE, min_size: 2, pg_num: PG_NUM };
        map.pools.insert(id, pool);
        map.validate().unwrap();
        map
    }

    #[derive(Clone, Copy, Debug)]
    enum Layout {
        /// One OSD per host.
        Flat,
        /// 2 to 4 OSDs per host (drawn per host), as many hosts as that takes.
        Hosts,
    }

    /// `n` OSDs in `layout`, weights all 1.0 or (mixed) drawn from 0.5, 1.0, 1.5, 2.0.
    fn layout(seed: u64, n: u32, layout: Layout, mixed: bool) -> Vec<(String, u32)> {
        let mut rng = splitmix(seed ^ u64::from(n) << 32);
        let mut next = || {
            rng = splitmix(rng);
            rng
        };
        let mut osds = Vec::new();
        let mut host = 0;
        while osds.len() < n as usize {
            let per_host = match layout {
                Layout::Flat => 1,
                Layout::Hosts => 2 + (next() % 3) as usize,
            };
            for _ in 0..per_host.min(n as usize - osds.len()) {
                let weight = if mixed { (1 + (next() % 4) as u32) * WEIGHT_ONE / 2 } else { WEIGHT_ONE };
                osds.push((format!("h{seed}-{host}"), weight));
            }
            host += 1;
        }
        osds
    }

    fn balanced(map: &OsdMap, previous: Option<&OsdMap>) -> OsdMap {
        let mut next = map.clone();
        balance(map, previous).apply_to(&mut next);
        next.validate().unwrap();
        next
    }

    fn sets(map: &OsdMap) -> Vec<Vec<OsdId>> {
        let pool = map.pools.values().next().unwrap();
        let placement = Placement::new(map);
        (0..pool.pg_num).map(|seed| placement.raw_osds(PgId::new(pool.id, seed)).unwrap()).collect()
    }

    /// Why a map cannot be balanced to ±15%, if it cannot: the failure domain caps a host at one replica
    /// per PG, so a host whose weight share of the replicas is above `pg_num` must fall short of it and
    /// push the others above theirs; and an OSD whose band [0.85, 1.15] x share holds no integer cannot
    /// be in it. Neither depends on the balancer.
    fn infeasible(map: &OsdMap) -> Option<String> {
        map.pools.values().find_map(|pool| infeasible_pool(map, pool))
    }

    fn infeasible_pool(map: &OsdMap, pool: &Pool) -> Option<String> {
        let eligible: Vec<(&OsdId, &OsdInfo)> =
            map.osds.iter().filter(|(_, i)| i.in_ && i.weight > 0).collect();
        let total: u64 = eligible.iter().map(|(_, i)| u64::from(i.weight)).sum();
        let mut hosts: BTreeMap<&str, u64> = BTreeMap::new();
        for (_, info) in &eligible {
            *hosts.entry(&info.host).or_default() += u64::from(info.weight);
        }
        if let Some((host, w)) = hosts.iter().find(|(_, &w)| u64::from(pool.size) * w > total) {
            return Some(format!("host {host} has weight {w} of {total}: more than 1/{} of it", pool.size));
        }
        let slots = u64::from(pool.pg_num) * u64::from(pool.size).min(eligible.len() as u64);
        for (osd, info) in &eligible {
            let (lo, hi) = band(slots, u64::from(info.weight), total);
            if lo > hi {
                return Some(format!("{osd}: no integer in its band"));
            }
        }
        None
    }

    /// The integers allowed for an OSD of weight `w` out of `total` holding `slots` replicas: those in
    /// [0.85, 1.15] x share, share = slots x w / total, i.e. from ceil(0.85 share) to floor(1.15 share).
    fn band(slots: u64, w: u64, total: u64) -> (u64, u64) {
        let lo = (85 * u128::from(slots) * u128::from(w)).div_ceil(100 * u128::from(total));
        let hi = (115 * u128::from(slots) * u128::from(w)) / (100 * u128::from(total));
        (lo as u64, hi as u64)
    }

    /// Largest |count / share - 1| over the eligible OSDs, for the printed table.
    fn worst_deviation(map: &OsdMap) -> f64 {
        let pool = map.pools.values().next().unwrap();
        let counts = pool_counts(map, pool.id);
        let total: u64 = counts.keys().map(|o| u64::from(map.osds[o].weight)).sum();
        let slots: u64 = counts.values().sum();
        counts
            .iter()
            .map(|(o, &c)| {
                let share = slots as f64 * f64::from(map.osds[o].weight) / total as f64;
                (c as f64 / share - 1.0).abs()
            })
            .fold(0.0, f64::max)
    }

    fn assert_within_band(map: &OsdMap, what: &str) {
        let pool = map.pools.values().next().unwrap();
        let counts = pool_counts(map, pool.id);
        let total: u64 = counts.keys().map(|o| u64::from(map.osds[o].weight)).sum();
        let slots: u64 = counts.values().sum();
        assert_eq!(slots, u64::from(pool.pg_num) * u64::from(pool.size).min(counts.len() as u64), "{what}");
        for (osd, &count) in &counts {
            let (lo, hi) = band(slots, u64::from(map.osds[osd].weight), total);
            assert!(lo <= count && count <= hi, "{what}: {osd} holds {count}, band {lo}..={hi}: {counts:?}");
        }
    }

    fn assert_failure_domain(map: &OsdMap, what: &str) {
        let hosts: BTreeSet<&str> =
            map.osds.values().filter(|i| i.in_ && i.weight > 0).map(|i| i.host.as_str()).collect();
        for set in sets(map) {
            let distinct: BTreeSet<&str> = set.iter().map(|o| map.osds[o].host.as_str()).collect();
            assert_eq!(distinct.len(), set.len().min(hosts.len()), "{what}: {set:?}");
        }
    }

    /// The balance requirement at 128 PGs, size 3, for 3 to 20 OSDs: after balancing, every in OSD
    /// holds between ceil(0.85 share) and floor(1.15 share) replicas of the pool. Over one OSD per host and
    /// 2-4 OSDs per host, equal and mixed weights, SEEDS maps each. Maps that no placement can balance (see
    /// `infeasible`) are skipped and counted: with 3 or 4 hosts of 2-4 OSDs, or mixed weights over few
    /// hosts, one host often carries more than a third of the weight (about a quarter of the maps, all of
    /// them in those layouts; asserted below so that the test keeps its teeth). Every N checks at least
    /// SEEDS maps, and one OSD per host with equal weights is never skipped.
    #[test]
    fn balances_within_15_percent_at_128_pgs() {
        let mut checked = 0;
        let mut skipped = 0;
        println!("N   worst deviation before -> after balancing (all layouts and seeds)");
        for n in 3..=20u32 {
            let checked_before = checked;
            let (mut worst_before, mut worst_after): (f64, f64) = (0.0, 0.0);
            for kind in [Layout::Flat, Layout::Hosts] {
                for mixed in [false, true] {
                    for seed in 0..SEEDS {
                        let map = cluster(seed, &layout(seed, n, kind, mixed));
                        if let Some(why) = infeasible(&map) {
                            assert!(mixed || matches!(kind, Layout::Hosts), "flat, equal weights: {why}");
                            println!("    skipped N={n} {kind:?} mixed={mixed} seed={seed}: {why}");
                            skipped += 1;
                            continue;
                        }
                        let what = format!("N={n} {kind:?} mixed={mixed} seed={seed}");
                        let after = balanced(&map, None);
                        assert_within_band(&after, &what);
                        assert_failure_domain(&after, &what);
                        worst_before = worst_before.max(worst_deviation(&map));
                        worst_after = worst_after.max(worst_deviation(&after));
                        checked += 1;
                    }
                }
            }
            println!("{n:2}  {:5.1}% -> {:4.1}%", 100.0 * worst_before, 100.0 * worst_after);
            assert!(checked - checked_before >= SEEDS, "N={n}: too few maps checked");
        }
        println!("checked {checked}, skipped {skipped}");
        assert!(skipped * 2 < checked, "too many maps skipped: {skipped} of {}", checked + skipped);
    }

    /// Replicas that must be copied to go from `before` to `after`: per PG, OSDs of the new set that were
    /// not in the old one (sets compared as sets: a reordering copies nothing). Also counted: how many of
    /// those copies go to an OSD other than `changed`.
    fn moved(before: &[Vec<OsdId>], after: &[Vec<OsdId>], changed: OsdId) -> (usize, usize) {
        let mut total = 0;
        let mut collateral = 0;
        for (old, new) in before.iter().zip(after) {
            for osd in new.iter().filter(|osd| !old.contains(osd)) {
                total += 1;
                if *osd != changed {
                    collateral += 1;
                }
            }
        }
        (total, collateral)
    }

    /// The movement requirement, with the balancer in the loop: from a balanced map of N OSDs (one
    /// per host, equal weights), adding one OSD or removing one (marked out, or purged) and rebalancing
    /// copies at most 1.5/N of the 384 replicas. Moved = replicas on an OSD that did not hold them before
    /// (compared as sets per PG; see `moved`; a replica that only changes position copies nothing and is not
    /// counted). Also asserted, so that nothing moves that need not:
    /// - adding an OSD copies replicas only onto it, before the balancer runs (straw2 plus the old items)
    ///   and after: no replica moves between two old OSDs;
    /// - removing an OSD copies the replicas it held, and at most 2 more (0 measured);
    /// - the result is balanced again (within the band) and a second run changes nothing.
    #[test]
    fn add_or_remove_one_osd_moves_at_most_1_5_over_n() {
        println!("N   bound   worst add (copies to old OSDs)   worst out (copies beyond held)   worst purge (same)");
        let mut worst_fraction: f64 = 0.0;
        let mut worst_extra = 0;
        for n in 3..=20u32 {
            let slots = (PG_NUM * u32::from(SIZE)) as usize;
            let bound = 1.5 / f64::from(n);
            let mut worst = [(0usize, 0usize); 3];
            for seed in 0..SEEDS {
                let osds = layout(seed, n, Layout::Flat, false);
                let start = balanced(&cluster(seed, &osds), None);
                let before = sets(&start);

                let mut grown = start.clone();
                let new = OsdId(n);
                grown.osds.insert(new, osd_info("new-host", WEIGHT_ONE));
                let unbalanced = sets(&grown);
                let (_, collateral) = moved(&before, &unbalanced, new);
                assert_eq!(collateral, 0, "N={n} seed={seed}: straw2 moved replicas between old OSDs");
                let grown_after = balanced(&grown, Some(&start));
                let add = moved(&before, &sets(&grown_after), new);

                let victim = OsdId((splitmix(seed) % u64::from(n)) as u32);
                let mut out = start.clone();
                out.osds.get_mut(&victim).unwrap().in_ = false;
                let out_after = balanced(&out, Some(&start));
                let marked_out = moved(&before, &sets(&out_after), victim);

                let mut purged = start.clone();
                purged.osds.remove(&victim);
                let purged_after = balanced(&purged, Some(&start));
                let purge = moved(&before, &sets(&purged_after), victim);

                // The least any placement can move: adding copies replicas only onto the new OSD, removing
                // copies the replicas the removed OSD held (`extra` more, printed and bounded).
                assert_eq!(add.1, 0, "N={n} seed={seed}: adding moved replicas between old OSDs");
                // With N = size the lost replicas have no host left to go to.
                let held = if n > u32::from(SIZE) {
                    before.iter().filter(|s| s.contains(&victim)).count()
                } else {
                    0
                };
                for result in [marked_out, purge] {
                    assert!(result.0 >= held, "N={n} seed={seed}: {} moved, {held} held", result.0);
                    worst_extra = worst_extra.max(result.0 - held);
                }
                for (i, (what, after, result)) in [
                    ("add", &grown_after, add),
                    ("out", &out_after, marked_out),
                    ("purge", &purged_after, purge),
                ]
                .into_iter()
                .enumerate()
                {
                    let what = format!("N={n} seed={seed} {what}");
                    let fraction = result.0 as f64 / slots as f64;
                    assert!(fraction <= bound, "{what}: moved {} of {slots} replicas", result.0);
                    worst_fraction = worst_fraction.max(fraction * f64::from(n));
                    if infeasible(after).is_none() {
                        assert_within_band(after, &what);
                    }
                    assert!(balance(after, None).is_empty(), "{what}: not a fixed point");
                    let second = if i == 0 { result.1 } else { result.0 - held };
                    worst[i] = worst[i].max((result.0, second));
                }
            }
            let pct = |x: usize| 100.0 * x as f64 / slots as f64;
            println!(
                "{n:2}  {:4.1}%  {:4.1}% ({:2})  {:4.1}% ({:2})  {:4.1}% ({:2})",
                100.0 * bound,
                pct(worst[0].0),
                worst[0].1,
                pct(worst[1].0),
                worst[1].1,
                pct(worst[2].0),
                worst[2].1
            );
        }
        println!("worst moved fraction x N: {worst_fraction:.3} (bound 1.5); worst extra on removal: {worst_extra}");
        // Measured: 0. A regression in move selection shows here.
        assert!(worst_extra <= 2, "removal copied {worst_extra} replicas more than the removed OSD held");
    }

    /// The movement bound with 2-4 OSDs per host (equal weights): a new OSD joins an existing host or a
    /// host of its own, or an OSD is marked out. Maps whose start the failure domain keeps from balancing
    /// are skipped (see `infeasible`).
    #[test]
    fn movement_bound_holds_with_several_osds_per_host() {
        let slots = (PG_NUM * u32::from(SIZE)) as usize;
        let mut checked = 0;
        let mut worst_fraction: f64 = 0.0;
        for n in 6..=20u32 {
            for seed in 0..SEEDS {
                let osds = layout(seed, n, Layout::Hosts, false);
                let start = cluster(seed, &osds);
                if infeasible(&start).is_some() {
                    continue;
                }
                let start = balanced(&start, None);
                let before = sets(&start);
                let bound = 1.5 / f64::from(n);
                let mut cases = Vec::new();
                for host in [osds[0].0.clone(), "new-host".to_owned()] {
                    let mut grown = start.clone();
                    grown.osds.insert(OsdId(n), osd_info(&host, WEIGHT_ONE));
                    cases.push((format!("add on {host}"), grown));
                }
                let mut out = start.clone();
                out.osds.get_mut(&OsdId((splitmix(seed) % u64::from(n)) as u32)).unwrap().in_ = false;
                cases.push(("out".to_owned(), out));
                for (what, changed) in cases {
                    let what = format!("N={n} seed={seed} {what}");
                    let after = balanced(&changed, Some(&start));
                    let (copied, _) = moved(&before, &sets(&after), OsdId(n));
                    let fraction = copied as f64 / slots as f64;
                    assert!(fraction <= bound, "{what}: moved {copied} of {slots}");
                    worst_fraction = worst_fraction.max(fraction * f64::from(n));
                    assert_failure_domain(&after, &what);
                    if infeasible(&after).is_none() {
                        assert_within_band(&after, &what);
                    }
                    checked += 1;
                }
            }
        }
        println!("{checked} changes, worst moved fraction x N: {worst_fraction:.3} (bound 1.5)");
        assert!(checked >= 100, "only {checked} changes checked");
    }

    #[test]
    fn balancing_is_deterministic_and_byte_identical() {
        for n in [5, 12, 20] {
            for mixed in [false, true] {
                let map = cluster(9, &layout(9, n, Layout::Hosts, mixed));
                let first = balance(&map, None);
                assert!(!first.is_empty(), "N={n}: 128 PGs are never balanced by straw2 alone");
                // The same map built in the opposite order, and round-tripped through the codec.
                let mut rebuilt = OsdMap::new(map.fsid);
                for (id, info) in map.osds.iter().rev() {
                    rebuilt.osds.insert(*id, info.clone());
                }
                rebuilt.pools = map.pools.clone();
                let decoded = OsdMap::decode(&map.encode().unwrap()).unwrap();
                assert_eq!(balance(&rebuilt, None), first);
                assert_eq!(balance(&decoded, None), first);
                let a = balanced(&map, None).encode().unwrap();
                let b = balanced(&decoded, None).encode().unwrap();
                assert_eq!(a, b);
            }
        }
    }

    /// Pools are balanced each on its own (as Ceph's balancer does), since each pool's PGs carry that
    /// pool's data: three pools of different sizes and PG counts over the same OSDs.
    #[test]
    fn every_pool_is_balanced_on_its_own() {
        let mut map = cluster(11, &layout(11, 14, Layout::Hosts, false));
        for (id, size, pg_num) in [(50, 2, 64), (51, 3, 256)] {
            let pool = Pool { id: PoolId(id), name: format!("p{id}"), size, min_size: 1, pg_num };
            map.pools.insert(PoolId(id), pool);
        }
        assert!(infeasible(&map).is_none());
        let after = balanced(&map, None);
        for pool in after.pools.values() {
            let counts = pool_counts(&after, pool.id);
            let total: u64 = counts.keys().map(|o| u64::from(after.osds[o].weight)).sum();
            let slots: u64 = counts.values().sum();
            assert_eq!(slots, u64::from(pool.pg_num) * u64::from(pool.size));
            for (osd, &count) in &counts {
                let (lo, hi) = band(slots, u64::from(after.osds[osd].weight), total);
                assert!(
                    lo <= count && count <= hi,
                    "pool {}: {osd} holds {count}, band {lo}..={hi}",
                    pool.id
                );
            }
        }
        assert!(after.pg_upmap_items.keys().any(|pg| pg.pool == PoolId(50)));
        assert!(after.pg_upmap_items.keys().any(|pg| pg.pool == PoolId(51)));
    }

    /// Sum over eligible OSDs of the squared scaled deviation `c W - S w`, per pool, summed.
    fn squared_deviation(map: &OsdMap) -> u128 {
        let mut sum = 0u128;
        for pool in map.pools.values() {
            let counts = pool_counts(map, pool.id);
            let total: i128 = counts.keys().map(|o| i128::from(map.osds[o].weight)).sum();
            let slots: i128 = counts.values().map(|&c| i128::from(c)).sum();
            for (osd, &count) in &counts {
                let d = i128::from(count) * total - slots * i128::from(map.osds[osd].weight);
                sum += d.unsigned_abs().pow(2);
            }
        }
        sum
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Over random clusters (up to 24 OSDs on up to 8 hosts, some out, of weight 0 or down; sizes 1 to
        /// 5; up to 64 PGs): the result is a valid map, every item takes effect, sets keep the failure
        /// domain, only in OSDs of weight > 0 hold replicas, balancing never makes the spread worse, again
        /// changes nothing, and the same map always gives the same changes.
        #[test]
        fn balancing_random_clusters_keeps_every_invariant(map in arb_cluster()) {
            let changes = balance(&map, None);
            prop_assert_eq!(&balance(&map, None), &changes);
            let mut after = map.clone();
            changes.apply_to(&mut after);
            prop_assert!(after.validate().is_ok());
            prop_assert!(squared_deviation(&after) <= squared_deviation(&map));
            prop_assert!(balance(&after, None).is_empty());
            let placement = Placement::new(&after);
            for (pg, items) in &after.pg_upmap_items {
                let straw2 = placement.straw2_osds(*pg).unwrap();
                prop_assert_eq!(&effective(&placement, &straw2, items).items, items);
            }
            let eligible = |o: &OsdId| after.osds.get(o).is_some_and(|i| i.in_ && i.weight > 0);
            let hosts: BTreeSet<&str> =
                after.osds.values().filter(|i| i.in_ && i.weight > 0).map(|i| i.host.as_str()).collect();
            let pool = after.pools.values().next().unwrap();
            for seed in 0..pool.pg_num {
                let pg = PgId::new(pool.id, seed);
                let raw = placement.raw_osds(pg).unwrap();
                prop_assert_eq!(raw.len(), placement.straw2_osds(pg).unwrap().len());
                prop_assert!(raw.iter().all(eligible));
                let distinct: BTreeSet<&str> = raw.iter().map(|o| after.osds[o].host.as_str()).collect();
                prop_assert_eq!(distinct.len(), raw.len().min(hosts.len()), "{:?}", raw);
            }
        }
    }

    /// A down OSD that is still in keeps its replicas (the PG runs degraded): marking it down changes no
    /// upmap and moves nothing. Only marking it out does.
    #[test]
    fn down_but_in_moves_nothing() {
        let start = balanced(&cluster(4, &layout(4, 10, Layout::Flat, false)), None);
        let mut down = start.clone();
        down.osds.get_mut(&OsdId(3)).unwrap().up = false;
        assert!(balance(&down, Some(&start)).is_empty());
        assert_eq!(sets(&down), sets(&start));
        let mut out = down.clone();
        out.osds.get_mut(&OsdId(3)).unwrap().in_ = false;
        assert!(!balance(&out, Some(&down)).is_empty());
    }

    /// Items that stop taking effect (their target purged or out) are removed; those that still do are
    /// kept as they are.
    #[test]
    fn invalid_items_are_dropped_and_valid_ones_kept() {
        let start = balanced(&cluster(2, &layout(2, 8, Layout::Flat, false)), None);
        assert!(!start.pg_upmap_items.is_empty());
        let (&pg, items) = start.pg_upmap_items.iter().next().unwrap();
        let target = items[0].1;
        let mut out = start.clone();
        out.osds.get_mut(&target).unwrap().in_ = false;
        let changes = balance(&out, Some(&start));
        let still: Vec<&(OsdId, OsdId)> = changes
            .set
            .values()
            .flatten()
            .chain(
                start
                    .pg_upmap_items
                    .iter()
                    .filter(|(p, _)| !changes.set.contains_key(p) && !changes.removed.contains(p))
                    .flat_map(|(_, i)| i),
            )
            .collect();
        assert!(
            still.iter().all(|(from, to)| *from != target && *to != target),
            "{target} still mapped: {changes:?}"
        );
        assert!(changes.removed.contains(&pg) || changes.set.contains_key(&pg));
        // Every item of the result takes effect.
        let after = balanced(&out, Some(&start));
        let placement = Placement::new(&after);
        for (pg, items) in &after.pg_upmap_items {
            let straw2 = placement.straw2_osds(*pg).unwrap();
            assert_eq!(&effective(&placement, &straw2, items).items, items, "{pg}");
        }
    }

    /// Items the balancer did not write (chains, unknown OSDs, no-ops) do not lead it to write items the
    /// map refuses, and the map it leaves is balanced.
    #[test]
    fn foreign_items_leave_a_valid_balanced_map() {
        let mut map = cluster(6, &layout(6, 12, Layout::Flat, false));
        let pool = *map.pools.keys().next().unwrap();
        let placement = Placement::new(&map);
        let mut foreign = BTreeMap::new();
        for seed in 0..PG_NUM {
            let pg = PgId::new(pool, seed);
            let set = placement.straw2_osds(pg).unwrap();
            let spare: Vec<OsdId> = (0..12).map(OsdId).filter(|o| !set.contains(o)).collect();
            let items = match seed % 4 {
                0 => vec![(set[0], spare[0]), (spare[0], spare[1])],
                1 => vec![(set[1], OsdId(99)), (set[2], spare[seed as usize % spare.len()])],
                2 => vec![(spare[0], spare[1])],
                _ => continue,
            };
            foreign.insert(pg, items);
        }
        // Moving the target of one item onto the middle of a chain would name that OSD as `to` twice.
        let pg = PgId::new(pool, 3);
        let set = placement.straw2_osds(pg).unwrap();
        let spare: Vec<OsdId> = (0..12).map(OsdId).filter(|o| !set.contains(o)).collect();
        let chain = [(set[0], spare[0]), (spare[0], spare[1]), (set[1], spare[2])];
        let state = effective(&placement, &set, &chain);
        assert_eq!(state.items, chain, "all three take effect");
        assert_eq!(edit_items(&placement, &state, 1, spare[0], 0), None);
        assert!(edit_items(&placement, &state, 1, spare[3], 0).is_some());

        map.pg_upmap_items = foreign;
        map.validate().unwrap();

        // `balanced` validates the result.
        let after = balanced(&map, None);
        assert_within_band(&after, "foreign items");
        assert!(balance(&after, None).is_empty());
        assert!(after.pg_upmap_items.values().flatten().all(|&(_, to)| to != OsdId(99)));
    }

    #[test]
    fn fold_into_incremental_matches_apply_to() {
        let base = balanced(&cluster(5, &layout(5, 9, Layout::Flat, false)), None);
        let mut inc = base.incremental();
        inc.osd_changes.insert(OsdId(2), crate::map::OsdChange { in_: Some(false), ..Default::default() });
        // A hand-set item the balancer will have to drop (osd.2 goes out).
        let pg = PgId::new(*base.pools.keys().next().unwrap(), 0);
        let set = Placement::new(&base).raw_osds(pg).unwrap();
        let spare = (0..9).map(OsdId).find(|o| !set.contains(o) && *o != OsdId(2)).unwrap();
        inc.new_pg_upmap_items.insert(pg, vec![(set[0], spare)]);
        let mut tentative = base.clone();
        tentative.apply(&inc).unwrap();
        let changes = balance(&tentative, Some(&base));
        let mut expected = tentative.clone();
        changes.apply_to(&mut expected);
        changes.fold_into(&mut inc, &base);
        let mut got = base.clone();
        got.apply(&inc).unwrap();
        assert_eq!(got, expected);
        assert!(balance(&got, None).is_empty());
    }

    /// Bounded work: 128 PGs over 20 OSDs, from straw2 alone, with the clock read only here in the test.
    #[test]
    fn balancing_128_pgs_over_20_osds_is_fast() {
        let map = cluster(1, &layout(1, 20, Layout::Hosts, true));
        let start = std::time::Instant::now();
        let changes = balance(&map, None);
        let elapsed = start.elapsed();
        println!("balanced 128 PGs x 20 OSDs in {elapsed:?} with {} PGs upmapped", changes.set.len());
        // Generous against a loaded 2-core machine; typical is a fraction of a millisecond.
        assert!(elapsed < std::time::Duration::from_millis(200), "{elapsed:?}");
    }
}
