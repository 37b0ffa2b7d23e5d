// vrex fast path: WiCSum cluster selection, selection -> store slots, attention over the planned slots
// for frame and text steps (attend_plan: each KV head's rows gathered a few at a time into buffers that
// stay in cache, its own broadcast-FMA products), attention read in place from the slots for decode
// steps (attend_slots), ReSV's HC-table update (hc_add). CPU only.
// Measured and dropped (twice): attention computed in place over the slots with an online softmax (a
// flash-decoding loop over 16-key blocks, per KV head with its GQA rows, split into 1024-slot chunks)
// ran 2.9x slower than a gather + MKL's matmul for a 13-token frame step at 16K (8.6 vs 3.0 ms per
// layer, 44% selected). For decode rows (a few rows per KV head) attend_slots below wins: 0.71 vs 1.13 ms
// per layer at 16K with 26% selected (dense full over all 16K: 1.37 ms).
// The PyTorch reference lives in vrex/kv/cache.py (_attention), vrex/resv/wicsum.py and
// vrex/resv/table.py; tests/kv/test_fast_path.py holds the two equal.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <type_traits>
#include <vector>

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// WiCSum (vrex.resv.wicsum step 4): products on each row's fixed-point grid, GRID_BITS below its
// largest product, so every sum is an exact int64 and the order of accumulation does not matter.
// Then t* needs no sort of the row: a histogram of the sort keys gives each bucket's count and exact
// sum, the scan from the top bucket finds the one where Acc passes Th, and only that bucket is
// refined (the same histogram on its narrower key range, down to a few elements sorted by key and
// index). This is the WTU's bucket scan with early exit; it replaced an LSD radix sort of every row.
static constexpr int GRID_BITS = 40;
static constexpr int LOG_BUCKETS = 10;  // 1024 buckets per level: each level narrows the key range 1024-fold
static constexpr int64_t SMALL_GROUP = 32;

// Order-preserving image of a float key, descending: a smaller image is a larger key (ties equal).
static inline uint32_t descending_image(float f) {
  if (f == 0.0f) f = 0.0f;  // -0 and +0 compare equal: one image for both
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // ascending image
  return ~u;
}

// One valid cluster of a row: key = image << 32 | cluster index, so ascending keys are the row's sorted
// order (descending weight, ties by ascending index); P its product on the grid.
struct Elem {
  uint64_t key;
  int64_t P;
};

struct WiCSumScratch {
  std::vector<Elem> level[5];  // the row, then the crossing group of each refinement (32-bit keys: <= 4 levels)
  std::vector<int32_t> cnt[5];  // per level: a bucket's members, exact sum, and with negative products the
  std::vector<int64_t> sum[5], pos[5], mx[5];  // sum of its non-negative ones and its largest one
  std::vector<uint16_t> bucket;  // the row's bucket of each member (level 0)
};

// floor(ratio * float64(Sum)), clamped past every reachable Acc (|Acc| < 2^62): Acc > Th <=> Acc > this.
static inline int64_t threshold_floor(double ratio, int64_t total) {
  const double lim = 4611686018427387904.0;  // 2^62
  return (int64_t)std::min(lim, std::max(-lim, std::floor(ratio * (double)total)));
}

// Buckets of a key range [top, bot] of images: at most 2^LOG_BUCKETS of equal width 2^shift.
struct Buckets {
  uint32_t top;
  int shift;
  int64_t n;
  Buckets(uint32_t top_, uint32_t bot) : top(top_) {
    const uint32_t range = bot - top;
    shift = range ? std::max(0, 32 - __builtin_clz(range) - LOG_BUCKETS) : 0;
    n = (int64_t)(range >> shift) + 1;
  }
  int64_t of(uint64_t key) const { return (int64_t)(((uint32_t)(key >> 32) - top) >> shift); }
};

static void clear_level(WiCSumScratch& s, int d, int64_t nb, bool has_neg) {
  s.cnt[d].assign(nb, 0);
  s.sum[d].assign(nb, 0);
  if (has_neg) {
    s.pos[d].assign(nb, 0);
    s.mx[d].assign(nb, INT64_MIN);
  }
}

static inline void count(WiCSumScratch& s, int d, int64_t b, int64_t P, bool has_neg) {
  s.cnt[d][b]++;
  s.sum[d][b] += P;
  if (has_neg) {
    s.pos[d][b] += std::max<int64_t>(P, 0);
    s.mx[d][b] = std::max(s.mx[d][b], P);
  }
}

// The power of two that puts a row's products on its grid: GRID_BITS below the largest |product|.
static inline double grid_scale(double max_abs_product) {
  int e = 0;
  std::frexp(max_abs_product, &e);
  return std::ldexp(1.0, GRID_BITS - e);  // a power of two: the product stays exact
}

// Members m[0..n) already in the row's order, scanned from acc: the first i with Acc > T marks m[0..i]
// and gives i + 1; else -1, acc advanced by them all.
static int64_t take_in_order(const Elem* m, int64_t n, int64_t& acc, int64_t T, char* mark) {
  for (int64_t i = 0; i < n; ++i) {
    acc += m[i].P;
    if (acc > T) {
      for (int64_t j = 0; j <= i; ++j) mark[(uint32_t)m[j].key] = 1;
      return i + 1;
    }
  }
  return -1;
}

// The first bucket at or after b whose largest prefix could pass T from acc (acc and `above` advanced
// past the buckets skipped), or nb. A bucket's bound is its sum when no product is negative, else the
// sum of its non-negative products (they come first in the order) or, with none, its largest product.
static int64_t next_candidate(WiCSumScratch& s, int d, int64_t b, int64_t nb, int64_t& acc, int64_t& above,
                              int64_t T, bool has_neg) {
  for (; b < nb; ++b) {
    const int64_t c = s.cnt[d][b];
    if (!c) continue;
    const int64_t bound = !has_neg ? s.sum[d][b] : (s.pos[d][b] > 0 ? s.pos[d][b] : s.mx[d][b]);
    if (acc + bound > T) return b;
    acc += s.sum[d][b];
    above += c;
  }
  return nb;
}

static int64_t select_group(WiCSumScratch& s, int depth, int64_t n, int64_t& acc, int64_t T, bool has_neg,
                            char* mark);

// The buckets of level `depth` (histogram already counted over its members m[0..n), member i in bucket
// bucket_of(i)) scanned from the top: each candidate bucket (next_candidate) has the members above it
// marked, its own gathered into the next level and refined there; returns t* within the group, or -1
// with acc advanced by the group's sum. Marks above a candidate stand wherever the crossing turns out to
// be: everything sorted above the crossing is taken.
template <class BucketOf>
static int64_t scan_buckets(WiCSumScratch& s, int depth, const Elem* m, int64_t n, int64_t nb, BucketOf bucket_of,
                            int64_t& acc, int64_t T, bool has_neg, char* mark) {
  int64_t above = 0;  // group members in buckets above b
  for (int64_t b = 0;; ++b) {
    b = next_candidate(s, depth, b, nb, acc, above, T, has_neg);
    if (b == nb) return -1;
    // each level's bucket spans 2^shift images with shift <= bits of the range - LOG_BUCKETS, so a
    // 32-bit range is down to equal images (select_group's first branch) by depth 4
    TORCH_CHECK(depth + 1 < 5, "WiCSum: bucket refinement deeper than 4 levels");
    // branch-free: the buckets of consecutive clusters are as good as random
    std::vector<Elem>& sub = s.level[depth + 1];
    sub.resize(n);
    Elem* sp = sub.data();
    int64_t k0 = 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t bi = bucket_of(i);
      mark[(uint32_t)m[i].key] |= (char)(bi < b);
      sp[k0] = m[i];
      k0 += bi == b;
    }
    int64_t a = acc;
    const int64_t k = select_group(s, depth + 1, k0, a, T, has_neg, mark);
    if (k >= 0) return above + k;
    acc += s.sum[depth][b];
    above += s.cnt[depth][b];
  }
}

// Find t* inside the group level[depth][0..n) (ascending index order), entered with the prefix acc of
// everything sorted above it. Returns how many of the group are taken (their cluster indices marked)
// when Acc passes T inside it, else -1 with acc advanced by the group's sum.
static int64_t select_group(WiCSumScratch& s, int depth, int64_t n, int64_t& acc, int64_t T, bool has_neg,
                            char* mark) {
  Elem* m = s.level[depth].data();
  uint32_t top = UINT32_MAX, bot = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t im = (uint32_t)(m[i].key >> 32);
    top = std::min(top, im);
    bot = std::max(bot, im);
  }
  if (n <= SMALL_GROUP || top == bot) {  // sort the few (equal keys: already in index order) and scan
    if (top != bot) std::sort(m, m + n, [](const Elem& a, const Elem& b) { return a.key < b.key; });
    return take_in_order(m, n, acc, T, mark);
  }
  const Buckets bk(top, bot);
  clear_level(s, depth, bk.n, has_neg);
  for (int64_t i = 0; i < n; ++i) count(s, depth, bk.of(m[i].key), m[i].P, has_neg);
  return scan_buckets(s, depth, m, n, bk.n, [&](int64_t i) { return bk.of(m[i].key); }, acc, T, has_neg, mark);
}

// One row at level 0, the passes fused: (1) the largest |product|, the key range and the sign,
// branch-free over all clusters; (2) products on the grid, the row's elements and the histogram;
// (3) scan_buckets: the scan of bucket sums, marks above the crossing bucket and its members refined
// by select_group. Returns t*, or -1 when no prefix passes (marks then say nothing).
static int64_t wicsum_row(WiCSumScratch& s, const float* row, const int64_t* tc, const bool* v, int64_t C,
                          double ratio, char* mark, int64_t& nv_out) {
  double mxp = 0.0;
  int64_t nv = 0;
  uint32_t top = UINT32_MAX, bot = 0, neg = 0;
  for (int64_t c = 0; c < C; ++c) {
    const bool ok = v[c];
    const double p = (double)row[c] * (double)tc[c];  // exact: 24-bit weight times a count < 2^29
    mxp = std::max(mxp, ok ? std::fabs(p) : 0.0);
    const uint32_t im = descending_image(row[c]);
    top = std::min(top, ok ? im : UINT32_MAX);
    bot = std::max(bot, ok ? im : 0u);
    neg |= (uint32_t)(ok & (p < 0.0));
    nv += ok;
  }
  nv_out = nv;
  if (nv == 0) return 0;
  const bool has_neg = neg != 0;
  const double to_grid = grid_scale(mxp);
  const Buckets bk(top, bot);
  clear_level(s, 0, bk.n, has_neg);
  Elem* m = s.level[0].data();
  uint16_t* bu = s.bucket.data();
  int64_t n = 0, total = 0;
  for (int64_t c = 0; c < C; ++c) {
    if (!v[c]) continue;
    const int64_t P = (int64_t)std::floor((double)row[c] * (double)tc[c] * to_grid);
    const uint64_t key = ((uint64_t)descending_image(row[c]) << 32) | (uint64_t)c;
    const int64_t b = bk.of(key);
    total += P;
    m[n] = {key, P};
    bu[n++] = (uint16_t)b;
    count(s, 0, b, P, has_neg);
  }
  const int64_t T = threshold_floor(ratio, total);
  int64_t acc = 0;
  return scan_buckets(s, 0, m, n, bk.n, [&](int64_t i) { return (int64_t)bu[i]; }, acc, T, has_neg, mark);
}

// WiCSum union over rows (vrex.resv.wicsum.wicsum_select + WiCSumResult.union, same rules and the
// same integer arithmetic): keys w (or w*TC when weighted), descending and stable, invalid clusters
// never taken; t* = the first t with Acc(t) > ratio * Sum, else every valid cluster.
// Returns (chosen bool [H, C], taken int64 [H, R]).
std::vector<Tensor> wicsum_union(Tensor w, Tensor counts, Tensor valid, double ratio, bool weighted) {
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kFloat, "w must be float32 [H, R, C]");
  w = w.contiguous();
  counts = counts.to(at::kLong).contiguous();
  valid = valid.to(at::kBool).contiguous();
  const int64_t H = w.size(0), R = w.size(1), C = w.size(2);
  TORCH_CHECK(C < (int64_t(1) << 22), "WiCSum over ", C, " clusters: at most 2^22 - 1 per row");
  auto chosen = at::zeros({H, C}, at::kBool);
  auto taken = at::zeros({H, R}, at::kLong);
  if (C == 0) return {chosen, taken};
  const float* wp = w.data_ptr<float>();
  const int64_t* cp = counts.data_ptr<int64_t>();
  const bool* vp = valid.data_ptr<bool>();
  for (int64_t i = 0; i < H * C; ++i)
    TORCH_CHECK(!vp[i] || cp[i] < (int64_t(1) << 29), "a cluster token count of ", cp[i],
                " exceeds WiCSum's limit of 2^29 - 1");
  bool* outp = chosen.data_ptr<bool>();
  int64_t* tp = taken.data_ptr<int64_t>();
  std::mutex merge;
  // every (head, row) pair is independent: one parallel region over all of them (one per head cost a
  // thread hand-off per head per layer); each chunk ORs its union into `chosen`
  at::parallel_for(0, H * R, 1, [&](int64_t i0, int64_t i1) {
    WiCSumScratch s;
    s.level[0].resize(C);
    s.bucket.resize(C);
    std::vector<char> mark(H * C, 0);
    std::vector<double> pkey(weighted ? C : 0);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = i / R;
      const float* row = wp + i * C;
      const int64_t* tc = cp + h * C;
      const bool* v = vp + h * C;
      char* mk = mark.data() + h * C;
      int64_t nv = 0, t_star;
      if (!weighted) {
        t_star = wicsum_row(s, row, tc, v, C, ratio, mk, nv);
      } else {  // keys are float64 products: a stable sort of the row, then the same exact scan
        double mxp = 0.0;
        for (int64_t c = 0; c < C; ++c)
          if (v[c]) mxp = std::max(mxp, std::fabs((double)row[c] * (double)tc[c])), ++nv;
        const double to_grid = grid_scale(mxp);
        Elem* m = s.level[0].data();
        int64_t n = 0, total = 0;
        for (int64_t c = 0; c < C; ++c) {
          if (!v[c]) continue;
          pkey[c] = (double)row[c] * (double)tc[c];
          const int64_t P = (int64_t)std::floor(pkey[c] * to_grid);
          total += P;
          m[n++] = {(uint64_t)c, P};
        }
        std::stable_sort(m, m + n, [&](const Elem& a, const Elem& b) {
          return pkey[(uint32_t)a.key] > pkey[(uint32_t)b.key];
        });
        int64_t acc = 0;
        t_star = nv == 0 ? 0 : take_in_order(m, n, acc, threshold_floor(ratio, total), mk);
      }
      if (t_star < 0) {  // no prefix passes: every valid cluster
        t_star = nv;
        for (int64_t c = 0; c < C; ++c) mk[c] |= (char)v[c];
      }
      tp[i] = t_star;
    }
    std::lock_guard<std::mutex> lock(merge);
    for (int64_t c = 0; c < H * C; ++c)
      if (mark[c] && vp[c]) outp[c] = true;
  });
  return {chosen, taken};
}

// wicsum_union on raw scores s = q . Kc [H, R, C], normalised here as vrex.resv.wicsum.normalize_scores
// does (same float32 operations, so the same weights bit for bit): mode 0 "shift_min"
// ((s - min over valid) * scale), 1 "relu" (max(s * scale, 0)), 2 "raw" (s * scale); invalid clusters 0.
// ("softmax" stays in PyTorch: its vectorised exp is not reproduced here.) Saves the ~10 small tensor
// ops of the normalisation per layer.
std::vector<Tensor> wicsum_union_scores(Tensor s, Tensor counts, Tensor valid, int64_t mode, double scale, double ratio,
                                        bool weighted) {
  TORCH_CHECK(s.dim() == 3 && s.scalar_type() == at::kFloat, "scores must be float32 [H, R, C]");
  TORCH_CHECK(mode >= 0 && mode <= 2, "mode must be 0 (shift_min), 1 (relu) or 2 (raw), got ", mode);
  s = s.contiguous();
  valid = valid.to(at::kBool).contiguous();
  const int64_t H = s.size(0), R = s.size(1), C = s.size(2);
  auto w = at::empty({H, R, C}, at::kFloat);
  const float* sp = s.data_ptr<float>();
  const bool* vp = valid.data_ptr<bool>();
  float* wp = w.data_ptr<float>();
  const float sc = (float)scale;
  const float inf = std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < H * R; ++i) {
    const int64_t h = i / R;
    const float* x = sp + i * C;
    const bool* v = vp + h * C;
    float* y = wp + i * C;
    if (mode == 0) {
      float mn = inf;
      for (int64_t c = 0; c < C; ++c)
        if (v[c]) mn = std::min(mn, x[c]);
      if (!std::isfinite(mn)) mn = 0.f;
      for (int64_t c = 0; c < C; ++c) y[c] = v[c] ? (x[c] - mn) * sc : 0.f;
    } else if (mode == 1) {
      for (int64_t c = 0; c < C; ++c) y[c] = v[c] ? std::max(x[c] * sc, 0.f) : 0.f;
    } else {
      for (int64_t c = 0; c < C; ++c) y[c] = v[c] ? x[c] * sc : 0.f;
    }
  }
  return wicsum_union(w, counts, valid, ratio, weighted);
}

// A per-token index of vrex.kv.index.PagedIndex: pages of 1 << shift tokens; entry t of row h is in
// page t >> shift at column t & (P - 1). A page is int32 [H, P], or, once final, int16 [H, 2 + P]: a
// row's first two int16 hold its int32 bias, then value - bias. The pages are checked once per call,
// then read through raw pointers; only int32 pages are written (a narrow page is never written again).
struct Paged {
  std::vector<int32_t*> wide;          // int32 page, or nullptr
  std::vector<const int16_t*> narrow;  // int16 page, or nullptr
  int64_t shift, P, rows;
  Paged(const std::vector<Tensor>& pages, int64_t shift_, int64_t rows_, int64_t need, const char* what)
      : shift(shift_), P(int64_t(1) << shift_), rows(rows_) {
    TORCH_CHECK((int64_t)pages.size() * P >= need, what, " has room for ", (int64_t)pages.size() * P, " tokens, needs ", need);
    for (const auto& p : pages) {
      const bool is_wide = p.scalar_type() == at::kInt;
      TORCH_CHECK((is_wide || p.scalar_type() == at::kShort) && p.is_contiguous() && p.dim() == 2 && p.size(0) == rows &&
                      p.size(1) == (is_wide ? P : P + 2),
                  what, " pages must be contiguous int32 [", rows, ", ", P, "] or int16 [", rows, ", ", P + 2, "]");
      wide.push_back(is_wide ? p.data_ptr<int32_t>() : nullptr);
      narrow.push_back(is_wide ? nullptr : p.data_ptr<int16_t>());
    }
  }
  // Row h of narrow page p: its bias, and a pointer to its P offsets.
  const int16_t* narrow_row(int64_t p, int64_t h, int64_t& bias) const {
    const int16_t* r = narrow[p] + h * (P + 2);
    int32_t b;
    std::memcpy(&b, r, sizeof b);
    bias = b;
    return r + 2;
  }
  int64_t get(int64_t h, int64_t t) const {
    const int64_t p = t >> shift, o = t & (P - 1);
    if (wide[p]) return wide[p][h * P + o];
    int64_t bias;
    return bias + narrow_row(p, h, bias)[o];
  }
  int32_t& at(int64_t h, int64_t t) const {  // for writing: int32 pages only
    int32_t* page = wide[t >> shift];
    TORCH_CHECK(page != nullptr, "per-token index: token ", t, " is in a narrow (final) page");
    return page[h * P + (t & (P - 1))];
  }
};

// Work items of the token scans below are (head, range of tokens or ids), not heads: with 3 KV heads
// on 2 threads, one item per head left a thread idle a third of the time. Each item fills its own
// lists (never a vector shared with another thread: the heads' vector objects share cache lines, and
// two threads pushing into them made every push a cache miss); the lists are then copied in order.
constexpr int64_t SCAN_CHUNK = 16384;

// Lists of items (each of head item_head[i], a head's items consecutive and in order) -> (values int64
// [total], offs int64 [H + 1]), head h's values at [offs[h], offs[h+1]).
static std::vector<Tensor> pack_items(int64_t H, const std::vector<int64_t>& item_head,
                                      const std::vector<std::vector<int64_t>>& lists) {
  auto offs = at::zeros({H + 1}, at::kLong);
  int64_t* op = offs.data_ptr<int64_t>();
  const int64_t NI = (int64_t)lists.size();
  std::vector<int64_t> at_(NI);
  for (int64_t i = 0; i < NI; ++i) op[item_head[i] + 1] += (int64_t)lists[i].size();
  for (int64_t h = 0; h < H; ++h) op[h + 1] += op[h];
  std::vector<int64_t> cur(op, op + H);
  for (int64_t i = 0; i < NI; ++i) {
    at_[i] = cur[item_head[i]];
    cur[item_head[i]] += (int64_t)lists[i].size();
  }
  auto values = at::empty({op[H]}, at::kLong);
  int64_t* vp = values.data_ptr<int64_t>();
  at::parallel_for(0, NI, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) std::copy(lists[i].begin(), lists[i].end(), vp + at_[i]);
  });
  return {values, offs};
}

// Token ids (ascending) of the chosen clusters, per head: ids < n_past whose cluster is chosen.
// token_cluster: the pages of ReSV's token -> cluster map. Returns (ids int64 [total], offs int64 [H + 1]).
std::vector<Tensor> cluster_token_ids(Tensor chosen, std::vector<Tensor> tc_pages, int64_t shift, int64_t n_past) {
  chosen = chosen.to(at::kBool).contiguous();
  const int64_t H = chosen.size(0), C = chosen.size(1);
  const Paged tc(tc_pages, shift, H, n_past, "token_cluster");
  const bool* ch = chosen.data_ptr<bool>();
  const int64_t span = std::max(SCAN_CHUNK, tc.P) / tc.P * tc.P;  // whole pages per item
  std::vector<int64_t> item_head, item_t0;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t t0 = 0; t0 < n_past; t0 += span) {
      item_head.push_back(h);
      item_t0.push_back(t0);
    }
  std::vector<std::vector<int64_t>> lists(item_head.size());
  at::parallel_for(0, (int64_t)item_head.size(), 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t h = item_head[i], t_end = std::min(n_past, item_t0[i] + span);
      // branch-free: every token is written and the end moves when it is taken (whether a cluster is
      // chosen is a coin flip to the branch predictor: a branch per token cost a misprediction per two)
      std::vector<int64_t> out(t_end - item_t0[i]);
      int64_t m = 0;
      const bool* chh = ch + h * C;
      auto scan = [&](int64_t t0, int64_t n, auto row, int64_t bias) {  // a plain loop over one page's row
        for (int64_t j = 0; j < n; ++j) {
          const int64_t c = bias + row[j];
          out[m] = t0 + j;
          m += (uint64_t)c < (uint64_t)C && chh[(uint64_t)c < (uint64_t)C ? c : 0];
        }
      };
      for (int64_t t0 = item_t0[i]; t0 < t_end; t0 += tc.P) {
        const int64_t p = t0 >> tc.shift, n = std::min(tc.P, t_end - t0);
        if (tc.wide[p]) {
          scan(t0, n, tc.wide[p] + h * tc.P, 0);
        } else {
          int64_t bias;
          const int16_t* row = tc.narrow_row(p, h, bias);
          scan(t0, n, row, bias);
        }
      }
      out.resize(m);
      lists[i] = std::move(out);
    }
  });
  return pack_items(H, item_head, lists);
}

// Ascending order of a head's slots (distinct within a head and tier). Taken in id order they are
// sorted within each frame block (written in its cluster order, blocks at increasing slots) but not
// within a span regrouped by cluster (KVStore.regroup: a few hundred slots in any order), so neither an
// insertion sort (its moves grow with the square of the span) nor std::sort (O(n log n): 8.8 ms of a 16K
// frame step's 30 layers) fits. A bitmap of the slots' range sorts them in O(n + range / 64); a sorted
// list (`full`'s plans) is left after one pass; a range far wider than the count goes to std::sort.
static void sort_slots(int64_t* a, int64_t n) {
  if (n < 2) return;
  int64_t lo = a[0], hi = a[0];
  bool sorted = true;
  for (int64_t i = 1; i < n; ++i) {
    sorted &= a[i - 1] < a[i];
    lo = std::min(lo, a[i]);
    hi = std::max(hi, a[i]);
  }
  if (sorted) return;
  const int64_t range = hi - lo + 1;
  if (range > 64 * n + 4096) {
    std::sort(a, a + n);
    return;
  }
  std::vector<uint64_t> bits((range + 63) / 64, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t x = a[i] - lo;
    bits[x >> 6] |= uint64_t(1) << (x & 63);
  }
  int64_t set = 0;
  for (uint64_t w : bits) set += __builtin_popcountll(w);
  if (set != n) {  // repeated slots (never in a plan): keep them all
    std::sort(a, a + n);
    return;
  }
  int64_t k = 0;
  for (size_t w = 0; w < bits.size(); ++w)
    for (uint64_t b = bits[w]; b; b &= b - 1) a[k++] = lo + int64_t(w) * 64 + __builtin_ctzll(b);
}

// Runs of consecutive slots in a sorted list: the transfers a tier link makes for it.
static int64_t count_runs(const int64_t* v, int64_t n) {
  int64_t r = n ? 1 : 0;
  for (int64_t i = 1; i < n; ++i) r += (v[i] - v[i - 1] != 1);
  return r;
}

// Selection (token ids per head, ascending, or all when ids is empty and all_past) + always-kept
// ranges [0, sink) and [mid_end, n_past) -> physical slots per tier, skipping evicted tokens.
// Tiers by id: [0, d_end) disk, [d_end, h_end) host, [h_end, n) device.
// Returns (disk_slots, disk_offs, host_slots, host_offs, dev_slots, dev_offs, disk_runs, host_runs,
// selected_per_head). Slots of each head and tier are sorted (memory order: fewer cache misses and page
// faults; runs counted on it).
// pos: the pages of the layer's token -> slot map (vrex.kv.index.PagedIndex).
std::vector<Tensor> plan_reads(Tensor ids, Tensor offs, bool all_past, int64_t n_past, int64_t sink, int64_t mid_end,
                               std::vector<Tensor> pos_pages, int64_t shift, int64_t H, Tensor evicted, bool any_evicted,
                               int64_t d_end, int64_t h_end) {
  const Paged pos(pos_pages, shift, H, n_past, "pos");
  const bool* ev = any_evicted ? evicted.data_ptr<bool>() : nullptr;
  ids = ids.to(at::kLong).contiguous();
  offs = offs.to(at::kLong).contiguous();
  const int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t* op = offs.data_ptr<int64_t>();
  const int64_t lo = std::min(sink, n_past), hi = std::max(lo, mid_end);
  // a head's items, in token order: the sink [0, lo) as tokens; the middle [lo, hi) as tokens (all_past)
  // or as its selected ids (those in [lo, hi)); the recent [hi, n_past) as tokens
  struct Item { int64_t h; bool by_id; int64_t a, b; };
  std::vector<Item> items;
  auto cut = [&](int64_t h, bool by_id, int64_t a, int64_t b) {
    for (int64_t x = a; x < b; x += SCAN_CHUNK) items.push_back({h, by_id, x, std::min(b, x + SCAN_CHUNK)});
  };
  for (int64_t h = 0; h < H; ++h) {
    cut(h, false, 0, lo);
    if (all_past) cut(h, false, lo, hi);
    else cut(h, true, op[h], op[h + 1]);
    cut(h, false, hi, n_past);
  }
  const int64_t NI = (int64_t)items.size();
  std::vector<std::vector<int64_t>> disk(NI), host(NI), dev(NI);
  std::vector<int64_t> item_head(NI), item_sel(NI, 0);
  for (int64_t i = 0; i < NI; ++i) item_head[i] = items[i].h;
  at::parallel_for(0, NI, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const Item& w = items[i];
      const int64_t h = w.h;
      // each list sized for the whole item, cut to what was taken (no push_back's checks per token);
      // an evicted token is written and not counted
      // one uninitialised block for the three (a zero-filled vector per tier cost more than the scan)
      const int64_t n = w.b - w.a;
      std::unique_ptr<int64_t[]> buf(new int64_t[3 * n]);
      int64_t *dk = buf.get(), *hs = dk + n, *dv = hs + n;
      int64_t nd = 0, nh = 0, nv = 0;
      auto take = [&](int64_t t) {
        const int64_t s = pos.get(h, t), keep = ev ? !ev[t] : 1;
        if (t < d_end) dk[nd] = s, nd += keep;
        else if (t < h_end) hs[nh] = s, nh += keep;
        else dv[nv] = s, nv += keep;
      };
      if (w.by_id) {
        for (int64_t j = w.a; j < w.b; ++j) {
          const int64_t t = ip[j];
          if (t >= lo && t < hi) take(t);
        }
      } else {
        for (int64_t t = w.a; t < w.b; ++t) take(t);
      }
      item_sel[i] = nd + nh + nv;
      disk[i].assign(dk, dk + nd);
      host[i].assign(hs, hs + nh);
      dev[i].assign(dv, dv + nv);
    }
  });
  std::vector<std::vector<Tensor>> packed = {pack_items(H, item_head, disk), pack_items(H, item_head, host),
                                             pack_items(H, item_head, dev)};
  std::vector<int64_t> runs(3 * H, 0), sel(H, 0);
  for (int64_t i = 0; i < NI; ++i) sel[item_head[i]] += item_sel[i];
  at::parallel_for(0, 3 * H, 1, [&](int64_t x0, int64_t x1) {
    for (int64_t x = x0; x < x1; ++x) {  // each head's slots of each tier, sorted in place
      const int64_t tier = x / H, h = x % H;
      int64_t* v = packed[tier][0].data_ptr<int64_t>();
      const int64_t* o = packed[tier][1].data_ptr<int64_t>();
      sort_slots(v + o[h], o[h + 1] - o[h]);
      runs[x] = count_runs(v + o[h], o[h + 1] - o[h]);
    }
  });
  std::vector<int64_t> disk_runs(runs.begin(), runs.begin() + H), host_runs(runs.begin() + H, runs.begin() + 2 * H);
  return {packed[0][0], packed[0][1], packed[1][0], packed[1][1], packed[2][0], packed[2][1],
          at::tensor(disk_runs, at::kLong), at::tensor(host_runs, at::kLong), at::tensor(sel, at::kLong)};
}

// A tier buffer as the kernels read it: [H, cap, D] with any head and slot strides and unit stride along
// D. The rings are contiguous [H, cap, D] (slot s lives at s % cap); the disk tier is its memory map
// [cap, H, D] seen through a transposed view (head stride D, slot stride H * D), so the page cache is
// read in place. Slot s of head h starts at base + h * head_stride + (s % cap) * slot_stride.
struct Tier {
  int64_t head_stride, slot_stride, cap;
  explicit Tier(const Tensor& b) : head_stride(b.stride(0)), slot_stride(b.stride(1)), cap(b.size(1)) {}
  int64_t at(int64_t h, int64_t s) const { return h * head_stride + (s % cap) * slot_stride; }
};

// One key row x [D] turned by a RoPE rotation into y (dims >= R pass through), in float32 as
// vrex.kv.layers.rerotate computes it: y = turn(x) * sin + x * cos, turn HALF (-x[d + R/2], x[d - R/2]) or PAIRS
// (-x[2i + 1], x[2i]). A pair's two dims share one angle, so c and s hold R/2 values, pair i's at i * cs: cs = 1
// for a packed half row (Turn's table) or a full-width vrex.kv.layers.rotation row of HALF (its first half);
// cs = 2 for a full-width row of PAIRS (its even entries).
static inline void rotate_row(const float* __restrict__ x, float* __restrict__ y, const float* __restrict__ c,
                              const float* __restrict__ s, int64_t cs, int64_t R, int64_t D, bool half) {
  const int64_t P = R / 2;
  if (half) {
    if (cs == 1) {  // the common case, kept apart so it vectorises
#pragma omp simd
      for (int64_t d = 0; d < P; ++d) {
        y[d] = -x[d + P] * s[d] + x[d] * c[d];
        y[d + P] = x[d] * s[d] + x[d + P] * c[d];
      }
    } else {
      for (int64_t d = 0; d < P; ++d) {
        y[d] = -x[d + P] * s[d * cs] + x[d] * c[d * cs];
        y[d + P] = x[d] * s[d * cs] + x[d + P] * c[d * cs];
      }
    }
  } else {
    for (int64_t i = 0; i < P; ++i) {
      y[2 * i] = -x[2 * i + 1] * s[i * cs] + x[2 * i] * c[i * cs];
      y[2 * i + 1] = x[2 * i] * s[i * cs] + x[2 * i + 1] * c[i * cs];
    }
  }
  for (int64_t d = R; d < D; ++d) y[d] = x[d];
}

// f rounded to bfloat16 (nearest, ties to even) and widened back, as c10::BFloat16 rounds finite values;
// bit operations only, so a row's loop vectorises. NaN stays NaN.
static inline float bf16_round(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
  u = (u & 0x7FFFFFFFu) > 0x7F800000u ? u : r;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// The disk tier keeps each key where it was written: a position re-index records the move in `owed` (int16,
// or int32 where moves pass 2^15, [rows, H]: positions the key in slot s of head h still has to turn; slots
// from `rows` on were written since and owe nothing) instead of rewriting the file, and every read turns the
// key by it (vrex.kv.store._Disk), through `table` (make_turn), the rotation of each integer move lo .. lo + rows - 1.
// A turned key is rounded to the tier's type, as a rotation in place would have stored it.
struct Turn {
  const int16_t* owed16 = nullptr;
  const int32_t* owed32 = nullptr;
  int64_t owed_rows = 0;
  const float* table = nullptr;  // [rows, R]: each row the R/2 cosines, then the R/2 sines, of one move
  int64_t H = 0, lo = 0, rows = 0, R = 0, D = 0;
  bool half = true, round_bf16 = false;
  int64_t tier = -1;  // which of the plan's tiers turns (-1: none)

  int64_t owed(int64_t slot, int64_t h) const {
    if (slot >= owed_rows) return 0;
    return owed16 ? owed16[slot * H + h] : owed32[slot * H + h];
  }

  // x [D] float -> y [D]: x turned by the key's owed move (a copy when it owes none).
  void apply(const float* x, float* y, int64_t slot, int64_t h) const {
    const int64_t m = owed(slot, h);
    if (m == 0) {
      std::memcpy(y, x, D * sizeof(float));
      return;
    }
    const int64_t r = m - lo;
    TORCH_CHECK(r >= 0 && r < rows, "a disk key owes a move of ", m, " positions, outside the table's ", lo, "..",
                lo + rows - 1);
    const float* c = table + r * R;
    rotate_row(x, y, c, c + R / 2, 1, R, D, half);
    if (round_bf16) {
#pragma omp simd
      for (int64_t d = 0; d < R; ++d) y[d] = bf16_round(y[d]);
    }
  }
};

// turn = {owed int16/int32 [rows, H], table float32 [rows, R]} (contiguous; empty: no tier turns) for tier `tier` of
// kbufs; table row r: the R/2 cosines then the R/2 sines of the move lo + r (a pair's two dims share one angle,
// so half a vrex.kv.layers.rotation row: 2 MB at 8K moves and R = 64, where the full rows missed the caches).
// The tensors stay owned by the caller for the call's duration.
static Turn make_turn(const std::vector<Tensor>& turn, int64_t lo, bool half, int64_t tier,
                      const std::vector<Tensor>& kbufs) {
  Turn t;
  if (turn.empty()) return t;
  TORCH_CHECK(turn.size() == 2, "turn must be [owed, table]");
  TORCH_CHECK(tier >= 0 && tier < (int64_t)kbufs.size(), "turn_tier ", tier, " is not one of the plan's tiers");
  const Tensor &owed = turn[0], &table = turn[1];
  const Tensor& kb = kbufs[tier];
  TORCH_CHECK((owed.scalar_type() == at::kShort || owed.scalar_type() == at::kInt) && owed.is_contiguous() &&
                  owed.dim() == 2 && owed.size(1) == kb.size(0), "owed must be a contiguous int16 or int32 [rows, H] tensor");
  TORCH_CHECK(table.scalar_type() == at::kFloat && table.is_contiguous() && table.dim() == 2 && table.size(1) % 2 == 0 &&
                  table.size(1) <= kb.size(2), "the turn's table must be contiguous float32 [rows, R], R even <= D");
  if (owed.scalar_type() == at::kShort) t.owed16 = owed.data_ptr<int16_t>();
  else t.owed32 = owed.data_ptr<int32_t>();
  t.owed_rows = owed.size(0);
  t.table = table.data_ptr<float>();
  t.H = kb.size(0);
  t.lo = lo;
  t.rows = table.size(0);
  t.R = table.size(1);
  t.D = kb.size(2);
  t.half = half;
  t.round_bf16 = kb.scalar_type() == at::kBFloat16;
  t.tier = tier;
  return t;
}

// Rows j0..j1 of head h's planned slots `sl` in tier buffers kb/vb (float32 or bfloat16) -> float32 rows
// of kout/vout (either may be nullptr: that half is not copied). In a ring (slot stride D) consecutive slots that do not wrap are one block of memory:
// a run is copied at once (`full` reads whole tiers, so its plans are a few long runs); the disk tier's
// slots interleave the heads and go row by row. `turn` (or nullptr): the tier's keys turn as they are read.
static void copy_rows(const Tensor& kb, const Tensor& vb, int64_t h, const int64_t* sl, int64_t j0, int64_t j1,
                      float* kout, float* vout, const Turn* turn = nullptr) {
  const Tier t(kb);
  const int64_t D = kb.size(2);
  const bool rows_adjacent = t.slot_stride == D;
  const bool f32 = kb.scalar_type() == at::kFloat;
  TORCH_CHECK(f32 || kb.scalar_type() == at::kBFloat16, "tier buffers must be float32 or bfloat16");
  const float* kf = f32 ? kb.data_ptr<float>() : nullptr;
  const float* vf = f32 ? vb.data_ptr<float>() : nullptr;
  const c10::BFloat16* kh = f32 ? nullptr : kb.data_ptr<c10::BFloat16>();
  const c10::BFloat16* vh = f32 ? nullptr : vb.data_ptr<c10::BFloat16>();
  if (turn && kout) {
    std::vector<float> x(D);
    for (int64_t j = j0; j < j1; ++j, kout += D) {
      const int64_t a = t.at(h, sl[j]);
      for (int64_t d = 0; d < D; ++d) x[d] = f32 ? kf[a + d] : static_cast<float>(kh[a + d]);
      turn->apply(x.data(), kout, sl[j], h);
    }
    kout = nullptr;  // the keys are done; the values below, if asked for, are copied as they are
  }
  if (!kout && !vout) return;
  for (int64_t j = j0, n = 1; j < j1; j += n) {
    n = 1;
    if (rows_adjacent) {
      const int64_t room = t.cap - sl[j] % t.cap;  // slots before the ring wraps
      while (j + n < j1 && n < room && sl[j + n] == sl[j] + n) ++n;
    }
    const int64_t a = t.at(h, sl[j]), len = n * D;
    if (f32) {
      if (kout) std::memcpy(kout, kf + a, len * sizeof(float));
      if (vout) std::memcpy(vout, vf + a, len * sizeof(float));
    } else {
      if (kout) for (int64_t d = 0; d < len; ++d) kout[d] = static_cast<float>(kh[a + d]);
      if (vout) for (int64_t d = 0; d < len; ++d) vout[d] = static_cast<float>(vh[a + d]);
    }
    if (kout) kout += len;
    if (vout) vout += len;
  }
}

static void check_tiers(const std::vector<Tensor>& kbufs, const std::vector<Tensor>& vbufs, int64_t D) {
  for (size_t i = 0; i < kbufs.size(); ++i)
    TORCH_CHECK(kbufs[i].dim() == 3 && kbufs[i].size(2) == D && kbufs[i].stride(2) == 1 &&
                    kbufs[i].sizes() == vbufs[i].sizes() && kbufs[i].strides() == vbufs[i].strides() &&
                    kbufs[i].scalar_type() == vbufs[i].scalar_type() &&
                    (kbufs[i].scalar_type() == at::kFloat || kbufs[i].scalar_type() == at::kBFloat16),
                "tier buffers must be float32 or bfloat16 [H, cap, D] with unit stride along D, K and V alike");
}

// ---------------------------------------------------------------------------------------------
// HCTable.add for the default table (intra "tokens", code update "leader", a scope window, no
// candidate cap), fused: sign bits (vrex.resv.hashing.hash_bits) -> packed codes, candidates from the active list, Hamming
// assignment (rule "nearest" or "first", as vrex.resv.clustering.cluster_frame), the commit into
// the table's buffers (count, key sum in token order as index_add_ does, last touch, leader code
// and token, token -> cluster) and the new active list. The PyTorch path in vrex/resv/table.py is
// the reference; tests/resv/test_table_fast.py holds the two equal, tensor for tensor.
// The caller ticks the clock and grows the per-cluster buffers (room for T new clusters) and the
// token -> cluster pages; the key pages a head needs are made here.
// Returns ((cluster ids int64 [H, T], active int64 [H, A], active_ok bool [H, A], comparisons int64 [H]),
// the key pages per head with any new ones).
std::tuple<std::vector<Tensor>, std::vector<std::vector<Tensor>>> hc_add(
                           Tensor bits, Tensor keys, Tensor active, Tensor active_ok, Tensor last, Tensor count,
                           std::vector<std::vector<Tensor>> key_pages, int64_t key_shift, Tensor codes, Tensor leader_tok,
                           std::vector<Tensor> tc_pages, int64_t tc_shift,
                           Tensor n_clusters, int64_t start, int64_t clock, int64_t scope, int64_t threshold, bool inclusive, bool first) {
  TORCH_CHECK(bits.dim() == 3 && bits.scalar_type() == at::kBool, "bits must be bool [H, T, n_hp]");
  TORCH_CHECK(keys.scalar_type() == at::kFloat && keys.is_contiguous(), "keys must be contiguous float32 [H, T, D]");
  for (const Tensor* t : {&last, &count, &codes, &leader_tok, &n_clusters})
    TORCH_CHECK(t->is_contiguous(), "HC table buffers must be contiguous");
  bits = bits.contiguous();
  active = active.contiguous();
  active_ok = active_ok.contiguous();
  const int64_t H = bits.size(0), T = bits.size(1), P = bits.size(2), D = keys.size(2);
  const int64_t B = codes.size(2), Ccap = count.size(1), A = active.size(1);
  TORCH_CHECK(B == (P + 7) / 8, "codes hold ", B, " bytes per code, n_hp=", P, " needs ", (P + 7) / 8);
  const Paged tc(tc_pages, tc_shift, H, start + T, "token_cluster");
  TORCH_CHECK(Ccap <= std::numeric_limits<int32_t>::max(), "cluster ids past int32 (", Ccap, " clusters)");
  // key sums per head (vrex/resv/keysums.py) in pages of KP cluster ids, [KP, D] each: float32 while
  // a page may still be touched, bfloat16 means once every cluster of it left the scope, which get no
  // pointer. A head's new pages are made here, when its first cluster of the page is. A flat store
  // passes one page per head, its whole buffer, and a shift past any id (never a new page).
  TORCH_CHECK(key_shift >= 0 && key_shift < 63, "key_shift out of range: ", key_shift);
  const int64_t KP = int64_t(1) << key_shift;
  TORCH_CHECK((int64_t)key_pages.size() == H, "HC key pages: one list per head expected, got ", key_pages.size());
  int64_t* ncl = n_clusters.data_ptr<int64_t>();
  std::vector<std::vector<float*>> key_base(H);
  for (int64_t h = 0; h < H; ++h) {
    TORCH_CHECK(ncl[h] + T <= Ccap, "HC table has room for ", Ccap, " clusters, head ", h, " may need ", ncl[h] + T);
    for (const auto& kpg : key_pages[h]) {
      const bool flat = key_pages[h].size() == 1 && kpg.size(0) < KP;
      TORCH_CHECK(kpg.dim() == 2 && kpg.is_contiguous() && kpg.size(1) == D && (kpg.size(0) == KP || flat),
                  "HC key pages must be contiguous [", KP, ", ", D, "]");
      TORCH_CHECK(!flat || (kpg.size(0) >= ncl[h] + T && kpg.scalar_type() == at::kFloat),
                  "a flat HC key buffer must be float32 with room for ", ncl[h] + T, " clusters, head ", h);
      key_base[h].push_back(kpg.scalar_type() == at::kFloat ? kpg.data_ptr<float>() : nullptr);
    }
  }
  auto ids_out = at::empty({H, T}, at::kLong);
  auto comps = at::zeros({H}, at::kLong);
  std::vector<std::vector<int64_t>> next_active(H);
  const bool* bp = bits.data_ptr<bool>();
  const float* kp = keys.data_ptr<float>();
  const int64_t* ap = active.data_ptr<int64_t>();
  const bool* aok = active_ok.data_ptr<bool>();
  int64_t* lastp = last.data_ptr<int64_t>();
  int64_t* cntp = count.data_ptr<int64_t>();
  uint8_t* cdp = codes.data_ptr<uint8_t>();
  int64_t* ltp = leader_tok.data_ptr<int64_t>();
  int64_t* idp = ids_out.data_ptr<int64_t>();
  int64_t* cmp = comps.data_ptr<int64_t>();
  auto eligible = [&](int64_t d) { return inclusive ? d <= threshold : d < threshold; };
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<uint8_t> cur(T * B);
    std::vector<int64_t> cand;
    for (int64_t h = h0; h < h1; ++h) {
      // packed codes of the step's tokens (little-endian bit order, as vrex.resv.hashing.pack_bits)
      std::fill(cur.begin(), cur.end(), 0);
      for (int64_t t = 0; t < T; ++t)
        for (int64_t p = 0; p < P; ++p)
          if (bp[(h * T + t) * P + p]) cur[t * B + p / 8] |= (uint8_t)(1u << (p % 8));
      // candidates: the active list's in-scope clusters, ascending id (the clock already ticked)
      cand.clear();
      for (int64_t a = 0; a < A; ++a) {
        int64_t c = ap[h * A + a];
        if (aok[h * A + a] && clock - lastp[h * Ccap + c] <= scope) cand.push_back(c);
      }
      const int64_t nv = (int64_t)cand.size();
      auto dist = [&](const uint8_t* x, const uint8_t* y) {
        int64_t d = 0;
        for (int64_t b = 0; b < B; ++b) d += __builtin_popcount((unsigned)(x[b] ^ y[b]));
        return d;
      };
      int64_t* ids = idp + h * T;
      int64_t n_new = 0, comparisons = 0;
      for (int64_t t = 0; t < T; ++t) {
        const uint8_t* code = cur.data() + t * B;
        int64_t target = -1;  // a table cluster id
        if (!first) {
          int64_t be = -1, bed = 0, bf = -1, bfd = 0;
          for (int64_t j = 0; j < nv; ++j) {
            int64_t d = dist(code, cdp + (h * Ccap + cand[j]) * B);
            if (eligible(d) && (be < 0 || d < bed)) { be = j; bed = d; }
          }
          for (int64_t s = 0; s < t; ++s) {
            int64_t d = dist(code, cur.data() + s * B);
            if (eligible(d) && (bf < 0 || d < bfd)) { bf = s; bfd = d; }
          }
          comparisons += nv + t;
          if (be >= 0 && (bf < 0 || bed <= bfd)) target = cand[be];
          else if (bf >= 0) target = ids[bf];
        } else {
          int64_t k = 0;
          for (; k < nv; ++k)
            if (eligible(dist(code, cdp + (h * Ccap + cand[k]) * B))) { target = cand[k]; break; }
          if (target >= 0) {
            comparisons += k + 1;
          } else {
            int64_t s = 0;
            for (; s < t; ++s)
              if (eligible(dist(code, cur.data() + s * B))) { target = ids[s]; break; }
            comparisons += target >= 0 ? nv + s + 1 : nv + t;
          }
        }
        if (target < 0) {  // a leader opens a new cluster (ids in leader-position order)
          target = ncl[h] + n_new++;
          std::memcpy(cdp + (h * Ccap + target) * B, code, B);
          ltp[h * Ccap + target] = start + t;
          while ((int64_t)key_base[h].size() <= (target >> key_shift)) {  // this head only: no race
            key_pages[h].push_back(at::zeros({KP, D}, at::kFloat));
            key_base[h].push_back(key_pages[h].back().data_ptr<float>());
          }
        }
        ids[t] = target;
        cntp[h * Ccap + target] += 1;
        float* page = key_base[h][target >> key_shift];
        // a compacted page holds only clusters out of scope, which are never candidates: unreachable
        TORCH_CHECK(page != nullptr, "HC table: cluster ", target, " of head ", h, " is in a compacted key page");
        float* sum = page + (target & (KP - 1)) * D;
        const float* k = kp + (h * T + t) * D;
        for (int64_t d = 0; d < D; ++d) sum[d] += k[d];
        lastp[h * Ccap + target] = clock;
        tc.at(h, start + t) = (int32_t)target;  // < Ccap, checked above
      }
      ncl[h] += n_new;
      cmp[h] = comparisons;
      // new active list: old in-scope entries and this step's clusters, unique, ascending
      auto& na = next_active[h];
      for (int64_t a = 0; a < A; ++a) {
        int64_t c = ap[h * A + a];
        if (aok[h * A + a] && clock - lastp[h * Ccap + c] <= scope) na.push_back(c);
      }
      na.insert(na.end(), ids, ids + T);
      std::sort(na.begin(), na.end());
      na.erase(std::unique(na.begin(), na.end()), na.end());
    }
  });
  int64_t A2 = 0;
  for (const auto& na : next_active) A2 = std::max(A2, (int64_t)na.size());
  auto act = at::zeros({H, A2}, at::kLong);
  auto act_ok = at::zeros({H, A2}, at::kBool);
  for (int64_t h = 0; h < H; ++h) {
    std::copy(next_active[h].begin(), next_active[h].end(), act.data_ptr<int64_t>() + h * A2);
    std::fill(act_ok.data_ptr<bool>() + h * A2, act_ok.data_ptr<bool>() + h * A2 + next_active[h].size(), true);
  }
  return {std::vector<Tensor>{ids_out, act, act_ok, comps}, key_pages};
}

// ---------------------------------------------------------------------------------------------
// Decode attention straight from the tier buffers: for the few query rows of a decode step (the G
// query heads of one KV head), each selected key and value row is read once from its slot, with an
// online softmax over blocks of 16 keys (flash-decoding); each head's slots are split into chunks so
// both threads work, and the chunks' partial (max, sum, acc) are merged with the step's own token.
// Why: at one query token the step is bound by memory traffic, and gather + BLAS moves every selected
// row three times (read, write the copy, read it again). For many rows (a frame step) the BLAS path
// stays faster: this loop measured 2x slower than gather + MKL at 39 rows (see the header).
namespace decode {
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));
constexpr int64_t BK = 16;      // keys per block: one vector of scores per row
constexpr int64_t CHUNK = 512;  // slots per work item

// exp, 16 wide: 2^n * p(r) with a degree-6 polynomial (|rel err| < 2e-7); inputs below -87 give ~0.
static inline v16 vexp(v16 x) {
  const v16 lo = (v16){} - 87.0f;
  x = x < lo ? lo : x;
  const v16 magic = (v16){} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const v16 n = (x * 1.44269504088896341f + magic) - magic;
  const v16 r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  v16 p = (v16){} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi16 e = (__builtin_convertvector(n, vi16) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}
// Sixteen vectors of partial sums -> one vector whose lane j is the sum of a[j] (a transpose-and-add tree:
// 15 shuffle pairs instead of 16 horizontal sums, whose serial adds made the loop latency-bound).
static inline v16 sum16(v16 a[16]) {
  const vi16 l1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const vi16 h1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const vi16 l2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const vi16 h2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const vi16 l3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const vi16 h3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  const vi16 l4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const vi16 h4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  v16 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i) b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], l1) + __builtin_shuffle(a[2 * i], a[2 * i + 1], h1);
  for (int i = 0; i < 4; ++i) c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], l2) + __builtin_shuffle(b[2 * i], b[2 * i + 1], h2);
  for (int i = 0; i < 2; ++i) d[i] = __builtin_shuffle(c[2 * i], c[2 * i + 1], l3) + __builtin_shuffle(c[2 * i], c[2 * i + 1], h3);
  return __builtin_shuffle(d[0], d[1], l4) + __builtin_shuffle(d[0], d[1], h4);
}
static inline float hmax(v16 x) { float m = x[0]; for (int i = 1; i < 16; ++i) m = std::max(m, x[i]); return m; }

template <typename T>
static inline v16 load16(const T* p) {
  v16 out;
  if constexpr (std::is_same<T, float>::value) std::memcpy(&out, p, sizeof out);
  else for (int e = 0; e < 16; ++e) out[e] = static_cast<float>(p[e]);
  return out;
}

// n slots of one head into the running (m, l, acc) of R rows q [R, DV * 16]. `turn` (or nullptr): the tier's
// keys turn as they are read (the disk tier after a re-index; Turn above), each block's 16 into a float copy.
template <int DV, typename T>
static void run_chunk(const float* q, int64_t R, const T* kb, const T* vb, const int64_t* sl, int64_t cap,
                      int64_t slot_stride, int64_t n, float* m, float* l, float* acc, const Turn* turn = nullptr,
                      int64_t h = 0) {
  constexpr int64_t D = DV * 16;
  const float ninf = -std::numeric_limits<float>::infinity();
  float turned[BK * D], x[D];
  for (int64_t j0 = 0; j0 < n; j0 += BK) {
    const int64_t nb = std::min(BK, n - j0);
    const T* kr[BK];
    const T* vr[BK];
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t s = (sl[j0 + j] % cap) * slot_stride;
      kr[j] = kb + s;
      vr[j] = vb + s;
    }
    if (turn)
      for (int64_t j = 0; j < nb; ++j) {
        for (int64_t d = 0; d < D; ++d) x[d] = static_cast<float>(kr[j][d]);
        turn->apply(x, turned + j * D, sl[j0 + j], h);
      }
    for (int64_t r = 0; r < R; ++r) {
      v16 qv[DV];
      std::memcpy(qv, q + r * D, sizeof qv);
      v16 a[BK];
      for (int64_t j = 0; j < BK; ++j) {
        a[j] = (v16){};
        if (j < nb) {
          if (turn)
            for (int v = 0; v < DV; ++v) a[j] += qv[v] * load16(turned + j * D + v * 16);
          else
            for (int v = 0; v < DV; ++v) a[j] += qv[v] * load16(kr[j] + v * 16);
        }
      }
      v16 sc = sum16(a);
      for (int64_t j = nb; j < BK; ++j) sc[j] = ninf;
      const float mb = hmax(sc);
      v16 av[DV];
      std::memcpy(av, acc + r * D, sizeof av);
      if (mb > m[r]) {  // a new running max: rescale what was summed so far (m = -inf at first: factor 0)
        const float corr = vexp((v16){} + (m[r] - mb))[0];
        l[r] *= corr;
        for (int v = 0; v < DV; ++v) av[v] *= corr;
        m[r] = mb;
      }
      const v16 p = vexp(sc - m[r]);  // lanes past nb hold -inf - m: exp gives ~0, and they are not summed below
      float ls = 0.f;
      for (int64_t j = 0; j < nb; ++j) ls += p[j];
      l[r] += ls;
      for (int64_t j = 0; j < nb; ++j)
        for (int v = 0; v < DV; ++v) av[v] += p[j] * load16(vr[j] + v * 16);
      std::memcpy(acc + r * D, av, sizeof av);
    }
  }
}
}  // namespace decode

// q: [Hq, T, D] float32, already scaled; tiers as in vrex.kv.store.ReadPlan; k_new/v_new [H, T, D]. D = 32, 64 or 128.
// Returns [Hq, T, D] float32. Query head h * G + g uses KV head h (transformers' repeat_kv order).
// turn, turn_lo, turn_half, turn_tier: a tier whose keys turn as they are read (Turn; empty: none).
Tensor attend_slots(Tensor q, std::vector<Tensor> kbufs, std::vector<Tensor> vbufs, std::vector<Tensor> slots,
                    std::vector<Tensor> offs, Tensor k_new, Tensor v_new, std::vector<Tensor> turn_tensors,
                    int64_t turn_lo, bool turn_half, int64_t turn_tier) {
  using namespace decode;
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "q must be float32 [Hq, T, D]");
  q = q.contiguous();
  k_new = k_new.to(at::kFloat).contiguous();
  v_new = v_new.to(at::kFloat).contiguous();
  const int64_t Hq = q.size(0), T = q.size(1), D = q.size(2), H = k_new.size(0);
  TORCH_CHECK(H > 0 && Hq % H == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(D == 32 || D == 64 || D == 128, "attend_slots takes head_dim 32, 64 or 128, got ", D);
  const int64_t G = Hq / H, R = G * T;
  const size_t S = kbufs.size();
  check_tiers(kbufs, vbufs, D);
  const Turn turn = make_turn(turn_tensors, turn_lo, turn_half, turn_tier, kbufs);
  struct Item { int64_t h; size_t tier; int64_t j0, j1; };
  std::vector<Item> items;
  for (int64_t h = 0; h < H; ++h)
    for (size_t i = 0; i < S; ++i) {
      const int64_t* o = offs[i].data_ptr<int64_t>();
      const int64_t n = o[h + 1] - o[h];
      for (int64_t j = 0; j < n; j += CHUNK) items.push_back({h, i, j, std::min(n, j + CHUNK)});
    }
  const int64_t NI = (int64_t)items.size();
  std::vector<float> pm(NI * R), pl(NI * R), pacc(NI * R * D);
  const float* qp = q.data_ptr<float>();
  at::parallel_for(0, NI, 1, [&](int64_t a0, int64_t a1) {
    for (int64_t it = a0; it < a1; ++it) {
      const Item& w = items[it];
      float* m = pm.data() + it * R;
      float* l = pl.data() + it * R;
      float* acc = pacc.data() + it * R * D;
      std::fill(m, m + R, -std::numeric_limits<float>::infinity());
      std::fill(l, l + R, 0.f);
      std::fill(acc, acc + R * D, 0.f);
      const float* qh = qp + w.h * R * D;  // the G query heads of KV head h are adjacent: R rows
      const Tier tier(kbufs[w.tier]);
      const int64_t cap = tier.cap, ss = tier.slot_stride, hs = w.h * tier.head_stride;
      const int64_t* sl = slots[w.tier].data_ptr<int64_t>() + offs[w.tier].data_ptr<int64_t>()[w.h] + w.j0;
      const int64_t n = w.j1 - w.j0;
      const bool f32 = kbufs[w.tier].scalar_type() == at::kFloat;
      const Turn* tt = (int64_t)w.tier == turn.tier ? &turn : nullptr;
#define VREX_RUN(DV)                                                                                                 \
  if (f32)                                                                                                           \
    run_chunk<DV, float>(qh, R, kbufs[w.tier].data_ptr<float>() + hs, vbufs[w.tier].data_ptr<float>() + hs, sl, cap, \
                         ss, n, m, l, acc, tt, w.h);                                                                 \
  else                                                                                                               \
    run_chunk<DV, c10::BFloat16>(qh, R, kbufs[w.tier].data_ptr<c10::BFloat16>() + hs,                                \
                                 vbufs[w.tier].data_ptr<c10::BFloat16>() + hs, sl, cap, ss, n, m, l, acc, tt, w.h);
      if (D == 32) { VREX_RUN(2) } else if (D == 64) { VREX_RUN(4) } else { VREX_RUN(8) }
#undef VREX_RUN
    }
  });
  auto out = at::empty({Hq, T, D}, at::kFloat);
  float* op = out.data_ptr<float>();
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    std::vector<float> acc(D), sc(T);
    for (int64_t h = h0; h < h1; ++h) {
      const float* kn = k_new.data_ptr<float>() + h * T * D;
      const float* vn = v_new.data_ptr<float>() + h * T * D;
      for (int64_t r = 0; r < R; ++r) {
        const int64_t t = r % T;  // row r is token t of query head h * G + r / T; it sees new tokens 0..t
        const float* qr = qp + (h * R + r) * D;
        float M = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j <= t; ++j) {
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * kn[j * D + d];
          sc[j] = dot;
          M = std::max(M, dot);
        }
        for (int64_t it = 0; it < NI; ++it)
          if (items[it].h == h) M = std::max(M, pm[it * R + r]);
        float L = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t it = 0; it < NI; ++it) {
          if (items[it].h != h || pl[it * R + r] == 0.f) continue;
          const float c = std::exp(pm[it * R + r] - M);
          L += c * pl[it * R + r];
          const float* pa = pacc.data() + (it * R + r) * D;
          for (int64_t d = 0; d < D; ++d) acc[d] += c * pa[d];
        }
        for (int64_t j = 0; j <= t; ++j) {
          const float p = std::exp(sc[j] - M);
          L += p;
          for (int64_t d = 0; d < D; ++d) acc[d] += p * vn[j * D + d];
        }
        float* orow = op + (h * R + r) * D;
        for (int64_t d = 0; d < D; ++d) orow[d] = acc[d] / L;
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Frame and text steps (many query rows per KV head). Each KV head's planned rows, then the step's own
// tokens, are cut into column blocks; a block is one work item: its scores (blk::scores, key rows gathered
// from the tiers KEY_SUB at a time), the causal mask on the step's columns and the softmax (down the
// block's columns), its output (blk::values, value rows gathered the same way), leaving per row a partial
// (max, sum, output) as flash attention's split-K does. The items of all heads run in one parallel
// region; the partials of a head's blocks are merged at the end (rescaled to the largest max).
// Why items over heads and blocks: with one head at a time and both threads inside each phase (copy,
// scores, softmax, output), every block paid four fork/joins and MKL's two-thread split of a 39-row
// matmul (when MKL computed the products); at 64K cached tokens (ReSV reading 63%) that was 17 ms per
// layer, 63% of the frame step.
// Blocks are sized so a step's work makes about ATTEND_ITEMS items (balance across heads of different
// lengths), at most `cols` rows each, so the workspace stays bounded however long the stream.
// Why not one padded gather of all heads + vrex.kv.cache._attention: at 16K cached tokens (ReSV, heads
// reading 9.8K / 7.3K / 4.8K tokens) that padded every head to the longest and allocated ~15 MB of fresh
// K/V copies per layer, which the kernel then faulted in page by page: 10.4 ms per layer against 2.8 ms.
// q [Hq, T, D] float32, already scaled; tiers as in vrex.kv.store.ReadPlan; k_new/v_new [H, T, D]; softcap <= 0: none
// (else transformers' order: tanh(s / cap) * cap, then the mask). ws: a float32 scratch tensor the caller
// keeps between calls (resized here when too small). Returns [Hq, T, D] float32.
// The block's own matrix products (no BLAS): MKL's sgemm on a gathered copy of the block paid the copy
// into a workspace of megabytes, then its own packing of that copy, for a product with only 39 rows (a
// frame step: 13 tokens x 3 query heads per KV head). Here key and value rows are gathered KEY_SUB at a
// time into buffers that stay in L1, and the scores are kept key-major (St[j][r], RG rows per key), so
// both products are broadcast-FMAs over 16 rows or 16 dims at a time and the softmax runs down columns,
// 16 rows per vector. On the kernel's inputs captured from a ReSV frame step at 64K cached tokens
// (5 layers, 2 threads): 15-17.5 ms per layer with MKL, 12.2 ms with these (a perf profile puts 18% of
// the samples in the gather's copies from memory).
namespace blk {
using decode::v16;
constexpr int64_t RG = 48;       // query rows per group: three vectors of scores per key
constexpr int64_t KEY_SUB = 64;  // key (or value) rows gathered at a time

// St[j * RG + r] = sum_d K[j * D + d] * Qt[d * RG + r], for j < n and r < 16 * NZ.
template <int NZ>
static void scores(const float* __restrict K, int64_t n, int64_t D, const float* __restrict Qt, float* __restrict St) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {  // 8 keys x NZ vectors of rows: 24 accumulators at NZ = 3
    v16 acc[8][NZ];
    for (int a = 0; a < 8; ++a)
      for (int z = 0; z < NZ; ++z) acc[a][z] = (v16){};
    for (int64_t d = 0; d < D; ++d) {
      v16 qv[NZ];
      for (int z = 0; z < NZ; ++z) std::memcpy(&qv[z], Qt + d * RG + 16 * z, sizeof(v16));
      for (int a = 0; a < 8; ++a) {
        const float k = K[(j + a) * D + d];
        for (int z = 0; z < NZ; ++z) acc[a][z] += k * qv[z];
      }
    }
    for (int a = 0; a < 8; ++a)
      for (int z = 0; z < NZ; ++z) std::memcpy(St + (j + a) * RG + 16 * z, &acc[a][z], sizeof(v16));
  }
  for (; j < n; ++j) {
    v16 acc[NZ];
    for (int z = 0; z < NZ; ++z) acc[z] = (v16){};
    for (int64_t d = 0; d < D; ++d) {
      const float k = K[j * D + d];
      for (int z = 0; z < NZ; ++z) {
        v16 qv;
        std::memcpy(&qv, Qt + d * RG + 16 * z, sizeof(v16));
        acc[z] += k * qv;
      }
    }
    for (int z = 0; z < NZ; ++z) std::memcpy(St + j * RG + 16 * z, &acc[z], sizeof(v16));
  }
}

// O[r * D + e] += sum_j P[j * RG + r] * V[j * D + e], for j < n and r < rows (O holds RG rows; rows of P
// past `rows` are 0). DZ = D / 16 vectors per row, rows in passes of 24 / DZ (24 accumulators).
template <int DZ>
static void values(const float* __restrict P, const float* __restrict V, int64_t n, int64_t rows, float* __restrict O) {
  constexpr int RS = DZ >= 24 ? 1 : 24 / DZ;
  constexpr int64_t D = 16 * DZ;
  for (int64_t r0 = 0; r0 < rows; r0 += RS) {  // RS divides RG: a pass past `rows` adds zeros
    v16 acc[RS][DZ];
    for (int a = 0; a < RS; ++a)
      for (int z = 0; z < DZ; ++z) std::memcpy(&acc[a][z], O + (r0 + a) * D + 16 * z, sizeof(v16));
    for (int64_t j = 0; j < n; ++j) {
      v16 vv[DZ];
      for (int z = 0; z < DZ; ++z) std::memcpy(&vv[z], V + j * D + 16 * z, sizeof(v16));
      const float* pj = P + j * RG + r0;
      for (int a = 0; a < RS; ++a)
        for (int z = 0; z < DZ; ++z) acc[a][z] += pj[a] * vv[z];
    }
    for (int a = 0; a < RS; ++a)
      for (int z = 0; z < DZ; ++z) std::memcpy(O + (r0 + a) * D + 16 * z, &acc[a][z], sizeof(v16));
  }
}

// Any other head size: the same sums, one row at a time.
static void values_any(const float* P, const float* V, int64_t n, int64_t rows, int64_t D, float* O) {
  for (int64_t j = 0; j < n; ++j)
    for (int64_t r = 0; r < rows; ++r) {
      const float p = P[j * RG + r];
      for (int64_t e = 0; e < D; ++e) O[r * D + e] += p * V[j * D + e];
    }
}

static void scores_for(int64_t rows, const float* K, int64_t n, int64_t D, const float* Qt, float* St) {
  if (rows <= 16) scores<1>(K, n, D, Qt, St);
  else if (rows <= 32) scores<2>(K, n, D, Qt, St);
  else scores<3>(K, n, D, Qt, St);
}

static void values_for(const float* P, const float* V, int64_t n, int64_t rows, int64_t D, float* O) {
  switch (D) {
    case 16: values<1>(P, V, n, rows, O); break;
    case 32: values<2>(P, V, n, rows, O); break;
    case 64: values<4>(P, V, n, rows, O); break;
    case 128: values<8>(P, V, n, rows, O); break;
    default: values_any(P, V, n, rows, D, O);
  }
}
}  // namespace blk

constexpr int64_t ATTEND_ROW_BLOCK = blk::RG;  // query rows per group in attend_plan (a frame step has 39)
constexpr int64_t ATTEND_COL_BLOCK = 8192;  // most key rows per block in attend_plan
constexpr int64_t ATTEND_MIN_BLOCK = 256;  // fewest key rows per block (below, a block is mostly overhead)
constexpr int64_t ATTEND_ITEMS = 8;  // blocks a step's work is cut into (about four per thread on 2 cores)

Tensor attend_plan(Tensor q, std::vector<Tensor> kbufs, std::vector<Tensor> vbufs, std::vector<Tensor> slots,
                   std::vector<Tensor> offs, Tensor k_new, Tensor v_new, double softcap, Tensor ws, int64_t cols,
                   std::vector<Tensor> turn_tensors, int64_t turn_lo, bool turn_half, int64_t turn_tier) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "q must be float32 [Hq, T, D]");
  TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.is_contiguous(), "ws must be a contiguous float32 tensor");
  TORCH_CHECK(cols > 0, "cols must be > 0");
  q = q.contiguous();
  k_new = k_new.to(at::kFloat).contiguous();
  v_new = v_new.to(at::kFloat).contiguous();
  const int64_t Hq = q.size(0), T = q.size(1), D = q.size(2), H = k_new.size(0);
  TORCH_CHECK(H > 0 && Hq % H == 0, "query heads must be a multiple of KV heads");
  const int64_t G = Hq / H, R = G * T;
  const size_t S = kbufs.size();
  check_tiers(kbufs, vbufs, D);
  const Turn turn = make_turn(turn_tensors, turn_lo, turn_half, turn_tier, kbufs);
  // tier_row[h][i]: the head's rows of tier i are plan rows tier_row[h][i] .. tier_row[h][i+1]-1
  std::vector<std::vector<int64_t>> tier_row(H, std::vector<int64_t>(S + 1, 0));
  std::vector<int64_t> lens(H, 0);
  int64_t total = 0;
  for (int64_t h = 0; h < H; ++h) {
    for (size_t i = 0; i < S; ++i) {
      const int64_t* o = offs[i].data_ptr<int64_t>();
      tier_row[h][i + 1] = tier_row[h][i] + o[h + 1] - o[h];
    }
    lens[h] = tier_row[h][S];
    total += lens[h] + T;
  }
  // the blocks depend on the work only, never on the thread count: a row's sum goes through the same
  // partials on any machine, so the output (and ReSV's later choices) does not change with the threads
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t CB = std::min(cols, std::max(ATTEND_MIN_BLOCK, (total + ATTEND_ITEMS - 1) / ATTEND_ITEMS));
  struct Item { int64_t h, c0, cb; };
  std::vector<Item> items;
  for (int64_t h = 0; h < H; ++h)
    for (int64_t c0 = 0; c0 < lens[h] + T; c0 += CB) items.push_back({h, c0, std::min(CB, lens[h] + T - c0)});
  const int64_t NI = (int64_t)items.size();
  // query rows in groups of RG (a fast-forwarded chunk of frames has hundreds of rows), scores of one
  // group over one block: the workspace stays bounded whatever the stream's length or the chunk's
  const int64_t RG = blk::RG, KS = blk::KEY_SUB;
  const int64_t per_thread = 2 * KS * D + CB * RG + 2 * RG * D;  // K and V rows, St, Qt, O
  const int64_t need = per_thread * std::min(threads, NI);
  if (ws.numel() < need) ws.resize_({need + need / 4});  // room to grow with the stream: fewer reallocations
  // partials per item and row: max, sum, and the unnormalised output
  std::vector<float> part_m(NI * R), part_l(NI * R), part_o(NI * R * D);
  const float ninf = -std::numeric_limits<float>::infinity();
  float* wsp = ws.data_ptr<float>();
  const float* qp = q.data_ptr<float>();
  using decode::v16;
  at::parallel_for(0, NI, 1, [&](int64_t a0, int64_t a1) {
    float* kw = wsp + per_thread * std::min<int64_t>(at::get_thread_num(), std::min(threads, NI) - 1);
    float* vw = kw + KS * D;
    float* st = vw + KS * D;  // [cb, RG]: the block's scores, then its probabilities, key-major
    float* qt = st + CB * RG;  // [D, RG]: the group's query rows, transposed, zero past its rows
    float* ow = qt + D * RG;  // [RG, D]: the group's unnormalised output
    for (int64_t it = a0; it < a1; ++it) {
      const Item& w = items[it];
      const int64_t h = w.h, c0 = w.c0, cb = w.cb, n = lens[h];
      const bool whole = c0 == 0 && cb == n + T;
      // the block's past columns [x0, x1) (relative to c0), tier by tier: fn(i, slots of the head on tier
      // i, first and end plan row on it, its first column - x0)
      auto tier_runs = [&](int64_t x0, int64_t x1, auto fn) {
        const int64_t g0 = c0 + x0, g1 = c0 + std::min(cb, x1);
        for (size_t i = 0; i < S; ++i) {
          const int64_t lo = std::max(tier_row[h][i], g0), hi = std::min({tier_row[h][i + 1], g1, n});
          if (hi > lo)
            fn(i, slots[i].data_ptr<int64_t>() + offs[i].data_ptr<int64_t>()[h], lo - tier_row[h][i],
               hi - tier_row[h][i], lo - g0);
        }
      };
      // columns [x0, x1) -> float32 rows of kout and/or vout: past rows from every tier, then the step's own tokens
      auto gather = [&](int64_t x0, int64_t x1, float* kout, float* vout) {
        tier_runs(x0, x1, [&](size_t i, const int64_t* sl, int64_t j0, int64_t j1, int64_t at) {
          copy_rows(kbufs[i], vbufs[i], h, sl, j0, j1, kout ? kout + at * D : nullptr, vout ? vout + at * D : nullptr,
                    (int64_t)i == turn.tier ? &turn : nullptr);
        });
        const int64_t g0 = c0 + x0, g1 = c0 + x1;
        const int64_t t0 = std::max(g0, n) - n, t1 = std::max(g1, n) - n;  // the step's own tokens
        if (t1 > t0) {
          const int64_t at_ = (n + t0 - g0) * D, len = (t1 - t0) * D * sizeof(float);
          if (kout) std::memcpy(kout + at_, k_new.data_ptr<float>() + (h * T + t0) * D, len);
          if (vout) std::memcpy(vout + at_, v_new.data_ptr<float>() + (h * T + t0) * D, len);
        }
      };
      // the tier rows of columns [x0, x1) asked of memory ahead of their gather: the next 64 rows arrive
      // while the current ones are multiplied, instead of after (the gather's reads were a quarter of the
      // kernel's time at 64K, waiting on memory)
      auto prefetch = [&](int64_t x0, int64_t x1, bool keys) {
        tier_runs(x0, x1, [&](size_t i, const int64_t* sl, int64_t j0, int64_t j1, int64_t) {
          const Tensor& b = keys ? kbufs[i] : vbufs[i];
          const Tier t(b);
          const char* base = static_cast<const char*>(b.data_ptr());
          const int64_t es = b.element_size(), row = D * es;
          for (int64_t j = j0; j < j1; ++j) {
            const char* r = base + t.at(h, sl[j]) * es;
            for (int64_t c = 0; c < row; c += 64) __builtin_prefetch(r + c, 0, 3);
          }
        });
      };
      float* pm = part_m.data() + it * R;
      float* pl = part_l.data() + it * R;
      float* po = part_o.data() + it * R * D;
      for (int64_t b0 = 0; b0 < R; b0 += RG) {
        const int64_t rb = std::min(RG, R - b0), nz = (rb + 15) / 16;
        // the group's query rows (rows b0.. of KV head h's G query heads, which are adjacent), transposed
        const float* qh = qp + (h * R + b0) * D;
        for (int64_t d = 0; d < D; ++d)
          for (int64_t r = 0; r < RG; ++r) qt[d * RG + r] = r < rb ? qh[r * D + d] : 0.f;
        for (int64_t x0 = 0; x0 < cb; x0 += KS) {  // scores, KEY_SUB keys at a time
          const int64_t x1 = std::min(cb, x0 + KS);
          gather(x0, x1, kw, nullptr);
          if (x1 < cb) prefetch(x1, x1 + KS, true);
          else prefetch(0, KS, false);  // the first value rows, for the output below
          blk::scores_for(rb, kw, x1 - x0, D, qt, st + x0 * RG);
        }
        // the softmax down each column, 16 rows per vector: soft-capping, the causal mask (row r is token
        // r % T of its query head: it sees the past and the step's tokens up to its own), max, exp, sum
        const int64_t first_new = std::max<int64_t>(0, n - c0);  // the block's first column of the step's tokens
        for (int64_t z = 0; z < nz; ++z) {
          float last[16];  // per row: its last visible column of this block + 1 (0: none)
          for (int e = 0; e < 16; ++e) {
            const int64_t r = b0 + 16 * z + e;
            last[e] = r < b0 + rb ? (float)std::max<int64_t>(0, std::min(cb, n + r % T + 1 - c0)) : 0.f;
          }
          v16 lastv;
          std::memcpy(&lastv, last, sizeof lastv);
          v16 mv = (v16){} + ninf;
          for (int64_t j = 0; j < cb; ++j) {
            float* sj = st + j * RG + 16 * z;
            v16 x;
            std::memcpy(&x, sj, sizeof x);
            if (softcap > 0)
              for (int e = 0; e < 16; ++e) x[e] = std::tanh(x[e] / (float)softcap) * (float)softcap;
            if (j >= first_new) x = (float)j < lastv ? x : (v16){} + ninf;
            std::memcpy(sj, &x, sizeof x);
            mv = x > mv ? x : mv;
          }
          const v16 m0 = mv == ninf ? (v16){} : mv;  // a row that sees nothing here: exp(-inf - 0) = 0
          v16 sv = (v16){};
          for (int64_t j = 0; j < cb; ++j) {
            float* sj = st + j * RG + 16 * z;
            v16 x;
            std::memcpy(&x, sj, sizeof x);
            const v16 ex = decode::vexp(x - m0);
            x = x == ninf ? (v16){} : ex;
            std::memcpy(sj, &x, sizeof x);
            sv += x;
          }
          if (whole) {  // the head in one block: probabilities normalised before the output product, as a
            const v16 inv = 1.f / (sv == 0.f ? (v16){} + 1.f : sv);  // plain softmax does
            for (int64_t j = 0; j < cb; ++j) {
              float* sj = st + j * RG + 16 * z;
              v16 x;
              std::memcpy(&x, sj, sizeof x);
              x *= inv;
              std::memcpy(sj, &x, sizeof x);
            }
            sv = sv == 0.f ? sv : (v16){} + 1.f;
          }
          for (int e = 0; e < 16 && 16 * z + e < rb; ++e) {
            pm[b0 + 16 * z + e] = mv[e];
            pl[b0 + 16 * z + e] = sv[e];
          }
        }
        for (int64_t j = 0; j < cb; ++j)  // rows past the group's in the last vector: no weight
          for (int64_t r = nz * 16; r < RG; ++r) st[j * RG + r] = 0.f;
        std::fill(ow, ow + RG * D, 0.f);
        for (int64_t x0 = 0; x0 < cb; x0 += KS) {  // output, KEY_SUB value rows at a time
          const int64_t x1 = std::min(cb, x0 + KS);
          gather(x0, x1, nullptr, vw);
          if (x1 < cb) prefetch(x1, x1 + KS, false);
          blk::values_for(st + x0 * RG, vw, x1 - x0, rb, D, ow);
        }
        std::memcpy(po + b0 * D, ow, rb * D * sizeof(float));
      }
    }
  });
  // merge each row's partials over its head's blocks (items of one head are consecutive)
  auto out = at::empty({Hq, T, D}, at::kFloat);
  float* op = out.data_ptr<float>();
  std::vector<int64_t> first(H + 1, NI);
  for (int64_t it = NI - 1; it >= 0; --it) first[items[it].h] = it;
  at::parallel_for(0, H * R, 16, [&](int64_t x0, int64_t x1) {
    for (int64_t x = x0; x < x1; ++x) {
      const int64_t h = x / R, r = x % R;
      const int64_t lo = first[h], hi = h + 1 < H ? first[h + 1] : NI;
      float m = ninf;
      for (int64_t it = lo; it < hi; ++it) m = std::max(m, part_m[it * R + r]);
      float* orow = op + x * D;  // out [Hq, T, D] viewed as [H, R, D]: row x
      std::fill(orow, orow + D, 0.f);
      float l = 0.f;
      for (int64_t it = lo; it < hi; ++it) {
        const float pmv = part_m[it * R + r];
        if (pmv == ninf) continue;
        const float a = std::exp(pmv - m);  // 1 for the block holding the max
        l += a * part_l[it * R + r];
        const float* po = part_o.data() + (it * R + r) * D;
        for (int64_t d = 0; d < D; ++d) orow[d] += a * po[d];
      }
      const float inv = 1.f / l;  // > 0: every row sees at least its own token
      for (int64_t d = 0; d < D; ++d) orow[d] *= inv;
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Position re-indexing in place (the reference: KVStore.keys -> vrex.kv.layers.rerotate -> KVStore.set_keys).
// Each live token's key is read from its tier slot, rotated by its own delta in float32 (cos/sin [N, R] are
// indexed by token id: R = the rotary width, dims >= R pass through) and written back in the tier's type,
// rounded once. `ids[i]` [n_i] are the token ids on tier i and `slots[i]` [H, n_i] their slots. `half`: RoPE
// pairs (d, d + R/2) (Llama, Qwen2, ...), else (2i, 2i + 1). `out` (float32 [H, N, D], or an empty tensor):
// the stored (rounded) keys by token id as well, for a policy that re-derives its index from them. The reference
// gathered every key into a new tensor, rotated it in four passes and scattered it back (1.8 s at 32K
// tokens over three tiers, `vrex bench soak`'s re-indexing frames).
void rotate_keys(std::vector<Tensor> kbufs, std::vector<Tensor> slots, std::vector<Tensor> ids, Tensor cos, Tensor sin,
                 bool half, Tensor out) {
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.dim() == 2 &&
                  cos.sizes() == sin.sizes(), "cos and sin must be float32 [N, R] of one shape");
  cos = cos.contiguous();
  sin = sin.contiguous();
  const int64_t R = cos.size(1);
  TORCH_CHECK(R % 2 == 0, "the rotary width must be even, got ", R);
  const bool want_out = out.numel() > 0;
  TORCH_CHECK(!want_out || (out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 3),
              "out must be a contiguous float32 [H, N, D] tensor (or empty)");
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  for (size_t i = 0; i < kbufs.size(); ++i) {
    const Tensor& kb = kbufs[i];
    TORCH_CHECK(kb.dim() == 3 && kb.stride(2) == 1 && (kb.scalar_type() == at::kFloat || kb.scalar_type() == at::kBFloat16),
                "tier buffers must be float32 or bfloat16 [H, cap, D] with unit stride along D");
    const int64_t H = kb.size(0), D = kb.size(2), n = ids[i].numel();
    TORCH_CHECK(R <= D, "rotary width ", R, " exceeds the key width ", D);
    Tensor sl = slots[i].contiguous(), id = ids[i].contiguous();
    TORCH_CHECK(sl.scalar_type() == at::kLong && id.scalar_type() == at::kLong && sl.dim() == 2 && sl.size(0) == H &&
                    sl.size(1) == n, "slots must be int64 [H, n] and ids int64 [n]");
    TORCH_CHECK(!want_out || (out.size(0) == H && out.size(2) == D), "out must be [H, N, D]");
    const int64_t* slp = sl.data_ptr<int64_t>();
    const int64_t* idp = id.data_ptr<int64_t>();
    for (int64_t j = 0; j < n; ++j)
      TORCH_CHECK(idp[j] >= 0 && idp[j] < cos.size(0) && (!want_out || idp[j] < out.size(1)), "token id ", idp[j],
                  " outside the rotation's ", cos.size(0), " rows");
    const Tier t(kb);
    const bool f32 = kb.scalar_type() == at::kFloat;
    float* of = want_out ? out.data_ptr<float>() : nullptr;
    const int64_t N = want_out ? out.size(1) : 0;
    auto rotate = [&](auto* base) {
      // token-major, heads inner: the disk tier keeps a token's heads side by side ([cap, H, D])
      at::parallel_for(0, n, 64, [&](int64_t a, int64_t b) {
        std::vector<float> x(D), y(D);
        for (int64_t j = a; j < b; ++j) {
          const int64_t tok = idp[j];
          const float* c = cp + tok * R;
          const float* s = sp + tok * R;
          for (int64_t h = 0; h < H; ++h) {
            auto* row = base + t.at(h, slp[h * n + j]);
            for (int64_t d = 0; d < D; ++d) x[d] = static_cast<float>(row[d]);
            rotate_row(x.data(), y.data(), c, s, half ? 1 : 2, R, D, half);
            using T = std::remove_reference_t<decltype(row[0])>;
            for (int64_t d = 0; d < R; ++d) row[d] = static_cast<T>(y[d]);
            if (of) {  // what the store now holds, rounded as it is
              float* o = of + (h * N + tok) * D;
              for (int64_t d = 0; d < D; ++d) o[d] = static_cast<float>(row[d]);
            }
          }
        }
      });
    };
    if (f32) rotate(kb.data_ptr<float>());
    else rotate(kb.data_ptr<c10::BFloat16>());
  }
}

// Position re-indexing on the disk tier (vrex.kv.store._Disk): the file is not written; the moves are recorded in
// `owed` (by _Disk.record_moves), and this hands a policy the keys as they now read: out (float32 [H, N, D]) row
// ids[j] of head h = the key in slot slots[h, j] turned by what it owes, rounded to the tier's type (Turn).
// Why: rewriting the whole tier at every re-index (2.2 GB at 97K tokens) left the kernel's writeback flusher
// on the same two cores 30 s later (frames 200-250 ms slower), and wrote 31 GB to the disk in an hour's stream.
void turn_disk_keys(Tensor kb, Tensor slots, Tensor ids, std::vector<Tensor> turn_tensors, int64_t lo, bool half,
                    Tensor out) {
  TORCH_CHECK(kb.dim() == 3 && kb.stride(2) == 1 && (kb.scalar_type() == at::kFloat || kb.scalar_type() == at::kBFloat16),
              "the disk tier must be float32 or bfloat16 [H, cap, D] with unit stride along D");
  const int64_t H = kb.size(0), D = kb.size(2), n = ids.numel();
  Tensor sl = slots.contiguous(), id = ids.contiguous();
  TORCH_CHECK(sl.scalar_type() == at::kLong && id.scalar_type() == at::kLong && sl.dim() == 2 && sl.size(0) == H &&
                  sl.size(1) == n, "slots must be int64 [H, n] and ids int64 [n]");
  const Turn turn = make_turn(turn_tensors, lo, half, 0, {kb});
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.dim() == 3 && out.size(0) == H &&
                  out.size(2) == D, "out must be a contiguous float32 [H, N, D] tensor");
  const int64_t* slp = sl.data_ptr<int64_t>();
  const int64_t* idp = id.data_ptr<int64_t>();
  const int64_t N = out.size(1);
  for (int64_t j = 0; j < n; ++j)
    TORCH_CHECK(idp[j] >= 0 && idp[j] < N, "token id ", idp[j], " outside out's ", N, " rows");
  const Tier t(kb);
  float* of = out.data_ptr<float>();
  auto turn_all = [&](auto* base) {
    at::parallel_for(0, n, 64, [&](int64_t a, int64_t b) {
      std::vector<float> x(D);
      for (int64_t j = a; j < b; ++j)
        for (int64_t h = 0; h < H; ++h) {
          const auto* row = base + t.at(h, slp[h * n + j]);
          for (int64_t d = 0; d < D; ++d) x[d] = static_cast<float>(row[d]);
          turn.apply(x.data(), of + (h * N + idp[j]) * D, slp[h * n + j], h);
        }
    });
  };
  if (kb.scalar_type() == at::kFloat) turn_all(kb.data_ptr<float>());
  else turn_all(kb.data_ptr<c10::BFloat16>());
}

// ReSV's HC table after re-indexing: every cluster's key sum recomputed from the re-rotated keys
// (HCTable.rebuild). The same float32 additions in the same token order as index_add_ (the reference),
// split over (head, block of 32 dims) so two threads share the work without sharing a sum.
Tensor cluster_sums(Tensor keys, Tensor clusters, int64_t C) {
  TORCH_CHECK(keys.scalar_type() == at::kFloat && keys.dim() == 3 && keys.is_contiguous(),
              "keys must be a contiguous float32 [H, N, D] tensor");
  TORCH_CHECK(clusters.scalar_type() == at::kLong && clusters.dim() == 2 && clusters.size(0) == keys.size(0) &&
                  clusters.size(1) == keys.size(1), "clusters must be int64 [H, N] (the token -> cluster map)");
  const int64_t H = keys.size(0), N = keys.size(1), D = keys.size(2);
  clusters = clusters.contiguous();
  const int64_t* cp = clusters.data_ptr<int64_t>();
  for (int64_t i = 0; i < H * N; ++i)
    TORCH_CHECK(cp[i] >= 0 && cp[i] < C, "cluster id ", cp[i], " outside 0..", C - 1);
  Tensor sums = at::zeros({H, C, D}, keys.options());
  const float* kp = keys.data_ptr<float>();
  float* sp = sums.data_ptr<float>();
  constexpr int64_t DB = 32;
  const int64_t blocks = (D + DB - 1) / DB;
  at::parallel_for(0, H * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t h = t / blocks, d0 = (t % blocks) * DB, d1 = std::min(D, d0 + DB);
      for (int64_t j = 0; j < N; ++j) {
        const float* __restrict__ k = kp + (h * N + j) * D;
        float* __restrict__ s = sp + (h * C + cp[h * N + j]) * D;
#pragma omp simd
        for (int64_t d = d0; d < d1; ++d) s[d] += k[d];
      }
    }
  });
  return sums;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wicsum_union", &wicsum_union, "WiCSum over rows, union per head");
  m.def("wicsum_union_scores", &wicsum_union_scores, "score normalisation (shift_min, relu, raw) + wicsum_union");
  m.def("cluster_token_ids", &cluster_token_ids, "token ids of chosen clusters per head");
  m.def("plan_reads", &plan_reads, "selection + always-kept -> tier slots");
  m.def("hc_add", &hc_add, "HCTable.add (default table), fused");
  m.def("cluster_sums", &cluster_sums, "per-cluster key sums from a token -> cluster map (HCTable.rebuild)");
  m.def("rotate_keys", &rotate_keys, "position re-indexing: each live key rotated in its tier slot, float32 math");
  m.def("turn_disk_keys", &turn_disk_keys, "the disk tier's keys turned by the moves they owe, by token id");
  m.def("attend_slots", &attend_slots, "decode attention over planned tier slots + new tokens, no copy",
        pybind11::arg("q"), pybind11::arg("kbufs"), pybind11::arg("vbufs"), pybind11::arg("slots"), pybind11::arg("offs"),
        pybind11::arg("k_new"), pybind11::arg("v_new"), pybind11::arg("turn") = std::vector<Tensor>{},
        pybind11::arg("turn_lo") = 0, pybind11::arg("turn_half") = true, pybind11::arg("turn_tier") = -1);
  m.attr("ATTEND_ROW_BLOCK") = ATTEND_ROW_BLOCK;
  m.attr("ATTEND_KEY_SUB") = blk::KEY_SUB;
  m.attr("ATTEND_COL_BLOCK") = ATTEND_COL_BLOCK;
  m.attr("ATTEND_MIN_BLOCK") = ATTEND_MIN_BLOCK;
  m.attr("ATTEND_ITEMS") = ATTEND_ITEMS;
  m.attr("SCAN_CHUNK") = SCAN_CHUNK;
  m.def("attend_plan", &attend_plan, "frame/text-step attention over planned tier slots + new tokens, per head, no padding",
        pybind11::arg("q"), pybind11::arg("kbufs"), pybind11::arg("vbufs"), pybind11::arg("slots"), pybind11::arg("offs"),
        pybind11::arg("k_new"), pybind11::arg("v_new"), pybind11::arg("softcap"), pybind11::arg("ws"),
        pybind11::arg("cols") = ATTEND_COL_BLOCK, pybind11::arg("turn") = std::vector<Tensor>{},
        pybind11::arg("turn_lo") = 0, pybind11::arg("turn_half") = true, pybind11::arg("turn_tier") = -1);
}
