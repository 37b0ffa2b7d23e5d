// vrex fast path: WiCSum cluster selection, selection -> store slots, and attention computed directly
// over the selected slots of the tier buffers (online softmax, no gathered copy). CPU only.
// The PyTorch reference lives in vrex/kv/cache.py (_attention), vrex/resv/wicsum.py and
// vrex/resv/table.py; tests/kv/test_fast_path.py holds the two equal.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

using at::Tensor;

// ---------------------------------------------------------------------------------------------
// WiCSum union over rows (vrex.resv.wicsum.wicsum_select + WiCSumResult.union, same rules):
// stable descending sort by key (w, or w*TC when weighted), invalid clusters last; products in
// float64 accumulated sequentially in sorted order; take the first t with Acc(t) > ratio * Sum,
// else every valid cluster. Returns (chosen bool [H, C], taken int64 [H, R]).
std::vector<Tensor> wicsum_union(Tensor w, Tensor counts, Tensor valid, double ratio, bool weighted) {
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kFloat, "w must be float32 [H, R, C]");
  w = w.contiguous();
  counts = counts.to(at::kLong).contiguous();
  valid = valid.to(at::kBool).contiguous();
  const int64_t H = w.size(0), R = w.size(1), C = w.size(2);
  auto chosen = at::zeros({H, C}, at::kBool);
  auto taken = at::zeros({H, R}, at::kLong);
  const float* wp = w.data_ptr<float>();
  const int64_t* cp = counts.data_ptr<int64_t>();
  const bool* vp = valid.data_ptr<bool>();
  bool* outp = chosen.data_ptr<bool>();
  int64_t* tp = taken.data_ptr<int64_t>();
  for (int64_t h = 0; h < H; ++h) {
    // rows of one head are independent; their unions are OR-ed per head afterwards
    std::vector<std::vector<char>> row_sel(R, std::vector<char>(C, 0));
    at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
      std::vector<int64_t> order(C);
      std::vector<double> key(C), prod(C);
      for (int64_t r = r0; r < r1; ++r) {
        const float* row = wp + (h * R + r) * C;
        int64_t nv = 0;
        for (int64_t c = 0; c < C; ++c) {
          bool ok = vp[h * C + c];
          nv += ok;
          double p = ok ? (double)row[c] * (double)cp[h * C + c] : 0.0;
          prod[c] = p;
          key[c] = ok ? (weighted ? p : (double)row[c]) : -std::numeric_limits<double>::infinity();
        }
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return key[a] > key[b]; });
        int64_t t_star = 0;
        if (nv > 0) {
          double total = 0.0;
          for (int64_t i = 0; i < nv; ++i) total += prod[order[i]];
          const double th = ratio * total;
          double acc = 0.0;
          t_star = nv;
          for (int64_t i = 0; i < nv; ++i) {
            acc += prod[order[i]];
            if (acc > th) { t_star = i + 1; break; }
          }
        }
        tp[h * R + r] = t_star;
        for (int64_t i = 0; i < t_star; ++i) row_sel[r][order[i]] = 1;
      }
    });
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c)
        if (row_sel[r][c] && vp[h * C + c]) outp[h * C + c] = true;
  }
  return {chosen, taken};
}

// Token ids (ascending) of the chosen clusters, per head: ids < n_past whose cluster is chosen.
// Returns (ids int64 [total], offs int64 [H + 1]).
std::vector<Tensor> cluster_token_ids(Tensor chosen, Tensor token_cluster, int64_t n_past) {
  chosen = chosen.to(at::kBool).contiguous();
  const int64_t H = chosen.size(0), C = chosen.size(1);
  TORCH_CHECK(token_cluster.size(0) == H && token_cluster.size(1) >= n_past, "token_cluster too short");
  auto tc = token_cluster.to(at::kLong);
  const int64_t stride = tc.stride(0);
  TORCH_CHECK(tc.stride(1) == 1, "token_cluster rows must be contiguous");
  const int64_t* tcp = tc.data_ptr<int64_t>();
  const bool* ch = chosen.data_ptr<bool>();
  std::vector<std::vector<int64_t>> per(H);
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      auto& out = per[h];
      out.reserve(n_past / 2);
      const int64_t* row = tcp + h * stride;
      for (int64_t t = 0; t < n_past; ++t) {
        int64_t c = row[t];
        if (c >= 0 && c < C && ch[h * C + c]) out.push_back(t);
      }
    }
  });
  auto offs = at::zeros({H + 1}, at::kLong);
  int64_t* op = offs.data_ptr<int64_t>();
  for (int64_t h = 0; h < H; ++h) op[h + 1] = op[h] + (int64_t)per[h].size();
  auto ids = at::empty({op[H]}, at::kLong);
  int64_t* ip = ids.data_ptr<int64_t>();
  for (int64_t h = 0; h < H; ++h) std::copy(per[h].begin(), per[h].end(), ip + op[h]);
  return {ids, offs};
}

// Selection (token ids per head, ascending, or all when ids is empty and all_past) + always-kept
// ranges [0, sink) and [mid_end, n_past) -> physical slots per tier, skipping evicted tokens.
// Tiers by id: [0, d_end) disk, [d_end, h_end) host, [h_end, n) device.
// Returns (host_slots, host_offs, dev_slots, dev_offs, disk_count, host_runs, selected_per_head)
// Slots of each head and tier are sorted (memory order: fewer cache misses; runs counted on it).
std::vector<Tensor> plan_reads(Tensor ids, Tensor offs, bool all_past, int64_t n_past, int64_t sink, int64_t mid_end,
                               Tensor pos, Tensor evicted, bool any_evicted, int64_t d_end, int64_t h_end) {
  const int64_t H = pos.size(0);
  auto posc = pos.to(at::kLong);
  TORCH_CHECK(posc.stride(1) == 1, "pos rows must be contiguous");
  const int64_t pstride = posc.stride(0);
  const int64_t* pp = posc.data_ptr<int64_t>();
  const bool* ev = any_evicted ? evicted.data_ptr<bool>() : nullptr;
  ids = ids.to(at::kLong).contiguous();
  offs = offs.to(at::kLong).contiguous();
  const int64_t* ip = ids.data_ptr<int64_t>();
  const int64_t* op = offs.data_ptr<int64_t>();
  std::vector<std::vector<int64_t>> host(H), dev(H);
  std::vector<int64_t> disk(H, 0), runs(H, 0), sel(H, 0);
  at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
    for (int64_t h = h0; h < h1; ++h) {
      const int64_t* prow = pp + h * pstride;
      auto take = [&](int64_t t) {
        if (ev && ev[t]) return;
        sel[h]++;
        int64_t s = prow[t];
        if (t < d_end) disk[h]++;
        else if (t < h_end) host[h].push_back(s);
        else dev[h].push_back(s);
      };
      for (int64_t t = 0; t < std::min(sink, n_past); ++t) take(t);
      const int64_t lo = std::min(sink, n_past), hi = std::max(lo, mid_end);
      if (all_past) {
        for (int64_t t = lo; t < hi; ++t) take(t);
      } else {
        for (int64_t i = op[h]; i < op[h + 1]; ++i) {
          int64_t t = ip[i];
          if (t >= lo && t < hi) take(t);
        }
      }
      for (int64_t t = hi; t < n_past; ++t) take(t);
      std::sort(host[h].begin(), host[h].end());
      std::sort(dev[h].begin(), dev[h].end());
      const auto& hs = host[h];
      int64_t r = hs.empty() ? 0 : 1;
      for (size_t i = 1; i < hs.size(); ++i) r += (hs[i] - hs[i - 1] != 1);
      runs[h] = r;
    }
  });
  auto pack = [&](std::vector<std::vector<int64_t>>& v) {
    auto o = at::zeros({H + 1}, at::kLong);
    int64_t* oo = o.data_ptr<int64_t>();
    for (int64_t h = 0; h < H; ++h) oo[h + 1] = oo[h] + (int64_t)v[h].size();
    auto s = at::empty({oo[H]}, at::kLong);
    int64_t* sp = s.data_ptr<int64_t>();
    for (int64_t h = 0; h < H; ++h) std::copy(v[h].begin(), v[h].end(), sp + oo[h]);
    return std::make_pair(s, o);
  };
  auto [hs, ho] = pack(host);
  auto [ds, dof] = pack(dev);
  auto disk_t = at::tensor(disk, at::kLong), runs_t = at::tensor(runs, at::kLong), sel_t = at::tensor(sel, at::kLong);
  return {hs, ho, ds, dof, disk_t, runs_t, sel_t};
}

// ---------------------------------------------------------------------------------------------
// Attention of the step's queries over selected slots of several tier buffers, plus the step's
// own new tokens (causal), with an online softmax across chunks (flash-decoding style).
// q [Hq, T, D] float32; kbufs/vbufs: [H, cap, D] (float32 or bfloat16); slots[i]: int64 absolute
// slots (index = slot % cap), offs[i]: int64 [H + 1]. dense_n[i] >= 0 means "dense_n[i] consecutive
// slots from slots[i][0]" for every head instead (e.g. the full policy's device ring). k_new/v_new [H, T, D] float32.
template <typename kv_t>
static inline float to_f(kv_t x) { return static_cast<float>(x); }

constexpr int64_t CHUNK = 128;

template <typename kv_t>
static void attend_source(const float* q, int64_t T, int64_t D, const kv_t* kb, const kv_t* vb, int64_t cap,
                          const int64_t* slots, int64_t start, int64_t n, bool dense, float scale, float* m, float* l, float* acc,
                          float* sc) {
  for (int64_t c0 = 0; c0 < n; c0 += CHUNK) {
    const int64_t cn = std::min(CHUNK, n - c0);
    for (int64_t r = 0; r < T; ++r) {
      const float* qr = q + r * D;
      float* srow = sc + r * CHUNK;
      float cmax = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < cn; ++j) {
        const int64_t s = dense ? ((start + c0 + j) % cap) : (slots[c0 + j] % cap);
        const kv_t* kr = kb + s * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) dot += qr[d] * to_f(kr[d]);
        dot *= scale;
        srow[j] = dot;
        cmax = std::max(cmax, dot);
      }
      const float m_new = std::max(m[r], cmax);
      const float corr = std::isinf(m[r]) ? 0.f : std::exp(m[r] - m_new);
      float* ar = acc + r * D;
      for (int64_t d = 0; d < D; ++d) ar[d] *= corr;
      float lsum = 0.f;
      for (int64_t j = 0; j < cn; ++j) {
        const float p = std::exp(srow[j] - m_new);
        lsum += p;
        const int64_t s = dense ? ((start + c0 + j) % cap) : (slots[c0 + j] % cap);
        const kv_t* vr = vb + s * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ar[d] += p * to_f(vr[d]);
      }
      l[r] = l[r] * corr + lsum;
      m[r] = m_new;
    }
  }
}

Tensor sparse_attention(Tensor q, std::vector<Tensor> kbufs, std::vector<Tensor> vbufs, std::vector<Tensor> slots,
                        std::vector<Tensor> offs, std::vector<int64_t> dense_n, Tensor k_new, Tensor v_new,
                        double scaling) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat, "q must be float32 [Hq, T, D]");
  q = q.contiguous();
  k_new = k_new.to(at::kFloat).contiguous();
  v_new = v_new.to(at::kFloat).contiguous();
  const int64_t Hq = q.size(0), T = q.size(1), D = q.size(2);
  const int64_t H = k_new.size(0), G = Hq / H;
  const size_t S = kbufs.size();
  for (size_t i = 0; i < S; ++i) {
    TORCH_CHECK(kbufs[i].is_contiguous() && vbufs[i].is_contiguous(), "tier buffers must be contiguous");
    TORCH_CHECK(kbufs[i].size(0) == H && kbufs[i].size(2) == D, "tier buffer shape");
  }
  auto out = at::empty({Hq, T, D}, at::kFloat);
  const float* qp = q.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  const float scale = (float)scaling;
  at::parallel_for(0, Hq, 1, [&](int64_t a, int64_t b) {
    std::vector<float> m(T), l(T), acc(T * D), sc(T * CHUNK);
    for (int64_t hq = a; hq < b; ++hq) {
      const int64_t h = hq / G;
      const float* qh = qp + hq * T * D;
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (size_t i = 0; i < S; ++i) {
        const int64_t cap = kbufs[i].size(1);
        const bool dense = dense_n[i] >= 0;
        int64_t n = 0, start = 0;
        const int64_t* sp = nullptr;
        if (dense) {
          n = dense_n[i];
          start = slots[i].numel() ? slots[i].data_ptr<int64_t>()[0] : 0;
        } else {
          const int64_t* o = offs[i].data_ptr<int64_t>();
          n = o[h + 1] - o[h];
          sp = slots[i].data_ptr<int64_t>() + o[h];
        }
        if (n == 0) continue;
        if (kbufs[i].scalar_type() == at::kFloat) {
          attend_source<float>(qh, T, D, kbufs[i].data_ptr<float>() + h * cap * D, vbufs[i].data_ptr<float>() + h * cap * D,
                               cap, sp, start, n, dense, scale, m.data(), l.data(), acc.data(), sc.data());
        } else if (kbufs[i].scalar_type() == at::kBFloat16) {
          attend_source<c10::BFloat16>(qh, T, D, kbufs[i].data_ptr<c10::BFloat16>() + h * cap * D,
                                       vbufs[i].data_ptr<c10::BFloat16>() + h * cap * D, cap, sp, start, n, dense, scale,
                                       m.data(), l.data(), acc.data(), sc.data());
        } else {
          TORCH_CHECK(false, "tier buffers must be float32 or bfloat16");
        }
      }
      // the step's own tokens: row r sees new tokens 0..r (causal)
      const float* kn = k_new.data_ptr<float>() + h * T * D;
      const float* vn = v_new.data_ptr<float>() + h * T * D;
      for (int64_t r = 0; r < T; ++r) {
        const float* qr = qh + r * D;
        float* srow = sc.data();
        float cmax = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j <= r; ++j) {
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * kn[j * D + d];
          dot *= scale;
          srow[j] = dot;
          cmax = std::max(cmax, dot);
        }
        const float m_new = std::max(m[r], cmax);
        const float corr = std::isinf(m[r]) ? 0.f : std::exp(m[r] - m_new);
        float* ar = acc.data() + r * D;
        for (int64_t d = 0; d < D; ++d) ar[d] *= corr;
        float lsum = 0.f;
        for (int64_t j = 0; j <= r; ++j) {
          const float p = std::exp(srow[j] - m_new);
          lsum += p;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ar[d] += p * vn[j * D + d];
        }
        const float inv = 1.f / (l[r] * corr + lsum);
        float* orow = outp + (hq * T + r) * D;
        for (int64_t d = 0; d < D; ++d) orow[d] = ar[d] * inv;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("wicsum_union", &wicsum_union, "WiCSum over rows, union per head");
  m.def("cluster_token_ids", &cluster_token_ids, "token ids of chosen clusters per head");
  m.def("plan_reads", &plan_reads, "selection + always-kept -> tier slots");
  m.def("sparse_attention", &sparse_attention, "attention over selected tier slots + new tokens");
}
