// fastint::coefficients: the float64 per-step table of an integrator (docs/design.md, "Tables").
//
// Every one-evaluation step of every integrator is a per-pixel affine map
//     z_{n+1} = P_n z_n + sum_j Q_{n,j} eps_{n-j} + S_n xi_n ,
// with 2x2 matrices (1x1 for VP, stored in the 00 slot, the rest zero). This file computes
// those matrices for a process, a time grid and a method; torch.ops.fastint.step applies them.
// Derivations: docs/integrators.md.
//
// Inputs
//   process  float64 [8] = [kind, beta_min, beta_max, Gamma, nu, M^-1, kappa, jitter],
//            kind 0 = VP (Gamma.. ignored), 1 = phase space (PSLD, CLD).
//   knots    float64 [K, 2] rows (t_i, B(t_i)) of a piecewise-linear B(t) (discrete schedules),
//            t from 0 to T, B from 0, both strictly increasing; or [0, 2] for the linear
//            beta(t) = beta_min + (t/T)(beta_max - beta_min).
//   method   "euler" | "em" | "ddim" | "lambda_ddim" | "sddim" | "conj_ms", or a splitting method
//            (phase space only): "nse" "nvv" "rse" "rvv" "cse" "cvv" "noba" "nbao" "nobab" "roba"
//            "sps" "cspss" "sscs".
//   times    float64 [N + 1], strictly decreasing in (0, T]: the N steps go from times[n] to
//            times[n + 1] (named grids are made in Python, fastint/grids.py; docs/design.md, "Times");
//            denoise adds one Tweedie row at times[N] (then N may be 0).
//   options  method options: lambda_ddim [lam, b (0: lam I, 1: lam ones)], sddim [eta],
//            conj_ms [k, corrector, interp, lower_final, predict], nse/rse/cse [first (0: x-flow first, 1: m-flow first)], sps [lam_s];
//            the others take none.
// Outputs
//   times    float64 [R]: the model-evaluation time of each row; NaN marks a row that makes no
//            model call (a splitting step's map that precedes the first call).
//   table    float64 [R, W], W = 7 + 4K (K = eps history length of the method), rows
//            [P00 P01 P10 P11, S00 S10 S11, Q0_00 Q0_01 Q0_10 Q0_11, Q1_.., ...].
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace fastint {
namespace {

// ----------------------------------------------------------------------------- 2x2 algebra
struct M2 {
  double a = 0, b = 0, c = 0, d = 0;  // [[a, b], [c, d]]
};
inline M2 operator+(const M2& x, const M2& y) { return {x.a + y.a, x.b + y.b, x.c + y.c, x.d + y.d}; }
inline M2 operator-(const M2& x, const M2& y) { return {x.a - y.a, x.b - y.b, x.c - y.c, x.d - y.d}; }
inline M2 operator*(double s, const M2& x) { return {s * x.a, s * x.b, s * x.c, s * x.d}; }
inline M2 operator*(const M2& x, const M2& y) {
  return {x.a * y.a + x.b * y.c, x.a * y.b + x.b * y.d, x.c * y.a + x.d * y.c, x.c * y.b + x.d * y.d};
}
inline M2 tr(const M2& x) { return {x.a, x.c, x.b, x.d}; }
inline M2 eye() { return {1, 0, 0, 1}; }
inline M2 diag(double p, double q) { return {p, 0, 0, q}; }

// exp(sign M) in closed form (Cayley-Hamilton): with mu = tr/2 and N = M - mu I (N^2 = delta I,
// delta = n^2 + pq from N's entries, no cancellation), exp(M) = e^mu (c I + s N),
// c = cosh(sqrt delta), s = sinh(sqrt delta)/sqrt delta (cos, sin for delta < 0). Entire in
// delta, hence exact at a repeated eigenvalue (c = s = 1) and smooth through it. exp(-M) has
// the same c and s, so an ill-conditioned exp(M) is never inverted numerically.
struct ExpmParts {
  double mu, n, p, q, delta, y;
  explicit ExpmParts(const M2& M)
      : mu(0.5 * (M.a + M.d)), n(0.5 * (M.a - M.d)), p(M.b), q(M.c), delta(n * n + p * q),
        y(std::sqrt(std::abs(delta))) {}
  M2 exp(double sign) const {  // sign = +1: exp(M), -1: exp(-M)
    const double m = sign * mu;
    double ec, es;  // e^m c, e^m s
    if (delta >= 0 && y > 1.0) {  // exponential form: no overflow of cosh while m + y stays moderate
      const double ep = std::exp(m + y), em = std::exp(m - y);
      ec = 0.5 * (ep + em);
      es = 0.5 * (ep - em) / y;
    } else {
      const double e = std::exp(m);
      ec = e * (delta >= 0 ? std::cosh(y) : std::cos(y));
      es = e * (y > 0 ? (delta >= 0 ? std::sinh(y) : std::sin(y)) / y : 1.0);
    }
    es *= sign;
    return {ec + es * n, es * p, es * q, ec - es * n};
  }
};
inline M2 expm2(const M2& M) { return ExpmParts(M).exp(1.0); }

// Lower Cholesky factor of a positive semidefinite 2x2 (a zero pivot gives a zero column).
M2 chol_psd(const M2& S) {
  const double l11 = std::sqrt(std::max(S.a, 0.0));
  const double l21 = l11 > 0 ? S.c / l11 : 0.0;
  return {l11, 0.0, l21, std::sqrt(std::max(S.d - l21 * l21, 0.0))};
}

// ----------------------------------------------------------------------------- Gauss-Legendre
constexpr int kGL = 8;  // nodes per panel
struct GaussLegendre {
  std::array<double, kGL> x{}, w{};  // on [0, 1]
  GaussLegendre() {
    const int n = kGL;
    for (int i = 0; i < n; ++i) {
      double z = std::cos(M_PI * (i + 0.75) / (n + 0.5)), dp = 0;
      for (int it = 0; it < 100; ++it) {  // Newton on P_n
        double p0 = 1, p1 = z;
        for (int k = 2; k <= n; ++k) {
          const double p2 = ((2 * k - 1) * z * p1 - (k - 1) * p0) / k;
          p0 = p1;
          p1 = p2;
        }
        dp = n * (z * p1 - p0) / (z * z - 1);
        const double dz = p1 / dp;
        z -= dz;
        if (std::abs(dz) < 1e-16) break;
      }
      x[i] = 0.5 * (1 - z);
      w[i] = 1.0 / ((1 - z * z) * dp * dp);  // 2/((1-z^2)P'^2), halved for [0, 1]
    }
  }
};
const GaussLegendre& gl() {
  static const GaussLegendre rule;
  return rule;
}
constexpr double kPanelW = 0.5;  // max panel width in w = log u
constexpr double kPanelB = 2.0;  // max panel width in B, times ||L||

// ----------------------------------------------------------------------------- the process
struct Process {
  bool aug = false;
  double beta_min = 0, beta_max = 0, gamma = 0, nu = 0, m_inv = 0, kappa = 0, jitter = 0, T = 1;
  std::vector<double> kt, kB;  // knots of B(t), empty for the linear schedule
  M2 A, D, S0;                 // F_t = beta(t) A, G G^T = beta(t) D, Sigma_0
  double normL = 0;            // bound on ||X -> AX + XA^T||

  // Knot interval (t_{i-1}, t_i] holding t, i in [1, K-1].
  size_t knot(const std::vector<double>& k, double v) const {
    size_t i = std::lower_bound(k.begin(), k.end(), v) - k.begin();
    return std::min(std::max<size_t>(i, 1), k.size() - 1);
  }
  double beta(double t) const {
    if (kt.empty()) return beta_min + (t / T) * (beta_max - beta_min);
    const size_t i = knot(kt, t);
    return (kB[i] - kB[i - 1]) / (kt[i] - kt[i - 1]);
  }
  double B(double t) const {
    if (kt.empty()) return t * (beta_min + 0.5 * (t / T) * (beta_max - beta_min));
    const size_t i = knot(kt, t);
    return kB[i - 1] + (t - kt[i - 1]) / (kt[i] - kt[i - 1]) * (kB[i] - kB[i - 1]);
  }
  double Binv(double b) const {
    if (kt.empty()) {
      const double c = (beta_max - beta_min) / T;
      return 2.0 * b / (beta_min + std::sqrt(beta_min * beta_min + 2.0 * c * b));
    }
    const size_t i = knot(kB, b);
    return kt[i - 1] + (b - kB[i - 1]) / (kB[i] - kB[i - 1]) * (kt[i] - kt[i - 1]);
  }

  // exp(b A): the transition Psi over an increment b of B.
  M2 expA(double b) const {
    if (!aug) { const double e = std::exp(-0.5 * b); return diag(e, e); }
    return expm2(b * A);
  }
  // (exp(b A), exp(-b A)), both in closed form.
  std::pair<M2, M2> expA_pair(double b) const {
    if (!aug) { const double e = std::exp(-0.5 * b), ei = std::exp(0.5 * b); return {diag(e, e), diag(ei, ei)}; }
    const ExpmParts parts(b * A);
    return {parts.exp(1.0), parts.exp(-1.0)};
  }
  // K(b) = int_0^b e^{rA} D e^{rA^T} dr: Taylor series at b/2^k (||L|| b/2^k <= 1/2), stopped
  // entrywise at relative 1e-17, then k doublings K(2b) = K(b) + e^{bA} K(b) e^{bA^T}.
  // No cancellation (docs/integrators.md), unlike the Lyapunov-equation closed form.
  M2 K(double b) const {
    if (!aug) { const double v = -std::expm1(-b); return diag(v, v); }
    int k = 0;
    double b0 = b;
    while (b0 * normL > 0.5) { b0 *= 0.5; ++k; }
    M2 term = b0 * D, sum = term;
    for (int n = 1; n < 40; ++n) {
      term = (b0 / (n + 1)) * (A * term + term * tr(A));
      sum = sum + term;
      const bool done = std::abs(term.a) <= 1e-17 * std::abs(sum.a) &&
                        std::abs(term.b) <= 1e-17 * std::abs(sum.b) + 1e-300 && std::abs(term.d) <= 1e-17 * std::abs(sum.d);
      if (n >= 3 && done) break;
    }
    for (int j = 0; j < k; ++j) {
      const M2 E = expA(b0 * std::ldexp(1.0, j));
      sum = sum + E * sum * tr(E);
    }
    return sum;
  }
  // Sigma at B = b (training convention Sigma_0, no jitter).
  M2 cov(double b) const {
    const M2 E = expA(b);
    return E * S0 * tr(E) + K(b);
  }
};

// L and L^{-T} of the eps convention (jitter on the diagonal for phase space).
struct Factor {
  M2 L, Linvt;
};
Factor factor(const Process& p, M2 S) {
  S.a += p.jitter;
  S.d += p.jitter;
  const double l11 = std::sqrt(S.a), l21 = S.c / l11, l22 = std::sqrt(S.d - l21 * l21);
  return {{l11, 0, l21, l22}, {1 / l11, -l21 / (l11 * l22), 0, 1 / l22}};
}

// ----------------------------------------------------------------------------- quadrature
// int_lo^hi f(u, b(u), Psi(lo, u), Sigma(u)) du over [lo, hi] (0 < lo < hi).
// In the variable w = log u, u^{-p} g(u) du becomes e^{(1-p)w} g(e^w) dw: smooth for the
// 1/sqrt(u) (PSLD), 1/u and 1/u^{3/2} (CLD) behaviours of L_u^{-T} at once, with the
// singularities at u <= 0 moved to Im w = +-pi, so Gauss-Legendre converges geometrically.
// Panels end at knots and are at most kPanelW wide in w and kPanelB/||L|| wide in B (the
// integrand changes like e^{||L|| B}). Sigma at a node is propagated from Sigma(lo).
template <class G>
void visit_nodes(const Process& p, double lo, double hi, const M2& S_lo, G g) {
  const double b_lo = p.B(lo), max_db = kPanelB / p.normL, grow = std::exp(kPanelW);
  const auto& rule = gl();
  double a = lo;
  while (a < hi) {
    double e = std::min({hi, a * grow, p.Binv(p.B(a) + max_db)});
    if (!p.kt.empty()) {  // stop at the next knot
      const auto k = std::upper_bound(p.kt.begin(), p.kt.end(), a);
      if (k != p.kt.end() && *k < e) e = *k;
    }
    if (e <= a || hi - e <= 1e-15 * hi) e = hi;
    const double wa = std::log(a), dw = std::log(e) - wa;
    for (int i = 0; i < kGL; ++i) {
      const double u = std::exp(wa + rule.x[i] * dw);
      const double bu = p.B(u);
      const auto [E, Einv] = p.expA_pair(bu - b_lo);
      const M2 Su = E * S_lo * tr(E) + p.K(bu - b_lo);
      g(rule.w[i] * dw * u, u, bu, Einv, Su);
    }
    a = e;
  }
}

// The quadrature rule of visit_nodes applied to one integrand f(u, b(u), Psi(lo, u), Sigma(u)).
template <class F>
M2 integrate(const Process& p, double lo, double hi, const M2& S_lo, F f) {
  M2 acc;
  visit_nodes(p, lo, hi, S_lo, [&](double w, double u, double bu, const M2& Psi, const M2& Su) {
    acc = acc + w * f(u, bu, Psi, Su);
  });
  return acc;
}

// ----------------------------------------------------------------------------- the table
struct Table {
  int K;    // eps history length
  bool vp;  // 1x1 process: only the 00 entries are meaningful, the rest are written as 0
  std::vector<double> times, rows;
  std::array<M2, 3> carry{};  // a correction of the last step (on eps_N, ...), for the denoising row
  bool x0_history = false;    // the history holds data predictions x0_hat, not eps (conj_ms predict='x0')
  int width() const { return 7 + 4 * K; }
  // One row per model call. Q has up to K matrices (the rest stay zero).
  void emit(double t, const M2& P, const M2& S, std::initializer_list<M2> Q) {
    times.push_back(t);
    const size_t r = rows.size();
    rows.resize(r + width(), 0.0);
    double* row = rows.data() + r;
    const double keep = vp ? 0.0 : 1.0;
    row[0] = P.a; row[1] = keep * P.b; row[2] = keep * P.c; row[3] = keep * P.d;
    row[4] = S.a; row[5] = keep * S.c; row[6] = keep * S.d;
    int j = 0;
    for (const M2& q : Q) {
      if (j == K) break;  // callers pass zeros beyond the method's history
      double* o = row + 7 + 4 * j++;
      o[0] = q.a; o[1] = keep * q.b; o[2] = keep * q.c; o[3] = keep * q.d;
    }
  }
};

struct Ctx {
  const Process& p;
  const std::vector<double>& t;  // times, t[0] > ... > t[N] (the last: the final time)
  const std::vector<M2>& S;      // Sigma (no jitter) at the grid times
  const std::vector<double>& opt;
  bool denoise;  // a Tweedie row follows the last step
  int N() const { return static_cast<int>(t.size()) - 1; }
};

// euler on the PF-ODE dz/dt = F z + 1/2 G G^T L^{-T} eps, from t to t' = t - h:
//   P = I - h beta A,  Q = -h 1/2 beta D L^{-T}.
void method_euler(const Ctx& c, Table& tab) {
  for (int n = 0; n < c.N(); ++n) {
    const double t = c.t[n], h = t - c.t[n + 1], be = c.p.beta(t);
    const Factor f = factor(c.p, c.S[n]);
    tab.emit(t, eye() - (h * be) * c.p.A, M2{}, {(-0.5 * h * be) * (c.p.D * f.Linvt)});
  }
}

// em (Euler-Maruyama) on the reverse SDE dz = [F z + G G^T L^{-T} eps] dt + G dw:
//   P = I - h beta A,  Q = -h beta D L^{-T},  S = chol(h beta D).
void method_em(const Ctx& c, Table& tab) {
  for (int n = 0; n < c.N(); ++n) {
    const double t = c.t[n], h = t - c.t[n + 1], be = c.p.beta(t);
    const Factor f = factor(c.p, c.S[n]);
    tab.emit(t, eye() - (h * be) * c.p.A, chol_psd((h * be) * c.p.D), {(-h * be) * (c.p.D * f.Linvt)});
  }
}

// ddim (conjugate integrator with B = 0, i.e. the exponential integrator):
//   P = Psi(t', t),  Q = -int_{t'}^{t} Psi(t', u) 1/2 beta(u) D L_u^{-T} du.
// VP: Q = sigma' - alpha' sigma / alpha, written without cancellation as
//   -e^{B'/2} expm1(B - B') / (sqrt(expm1 B) + sqrt(expm1 B')).
double vp_ddim_q(double b, double b1) {
  return -std::exp(0.5 * b1) * std::expm1(b - b1) / (std::sqrt(std::expm1(b)) + std::sqrt(std::expm1(b1)));
}

// VP: Gauss-Legendre nodes over the step [t1, t] in lam = -1/2 log(expm1 B) = -log(sigma/alpha),
// from lam(t) up to lam(t1): g(weight in dlam, lam, u(lam)). Panels <= 0.5 wide in lam, split at
// the knots of B (where t(lam) has a kink); u is clamped into [t1, t]. In lam the VP weights are
// e^{+-lam} times a function of u: entire between knots, whereas in t they are nearly singular where
// B -> 0 at a knot away from t = 0 (tables on VE or flow sigmas). docs/integrators.md §4.
template <class G>
void visit_lam_nodes(const Process& p, double t1, double t, G g) {
  auto lam_of = [](double b) { return -0.5 * std::log(std::expm1(b)); };
  std::vector<double> br{lam_of(p.B(t)), lam_of(p.B(t1))};
  for (size_t i = 0; i < p.kt.size(); ++i)
    if (p.kt[i] > t1 && p.kt[i] < t) br.push_back(lam_of(p.kB[i]));
  std::sort(br.begin(), br.end());
  const auto& rule = gl();
  for (size_t i = 0; i + 1 < br.size(); ++i) {
    const int m = std::max(1, static_cast<int>(std::ceil((br[i + 1] - br[i]) / 0.5)));
    const double h = (br[i + 1] - br[i]) / m;
    for (int j = 0; j < m; ++j)
      for (int q = 0; q < kGL; ++q) {
        const double lam = br[i] + h * (j + rule.x[q]);
        const double u = std::min(std::max(p.Binv(std::log1p(std::exp(-2.0 * lam))), t1), t);
        g(rule.w[q] * h, lam, u);
      }
  }
}

// -int_{t'}^{t} w(u) Psi(t', u) 1/2 beta(u) D L_u^{-T} du over step n, for a scalar weight w.
// VP (B(t') > 0): alpha' int_{rho}^{rho'} w drho with rho = sigma/alpha, integrated in lam.
template <class W>
M2 weighted_Q(const Ctx& c, int n, W w) {
  const Process& p = c.p;
  if (!p.aug && p.B(c.t[n + 1]) > 0.0) {
    const double a1 = std::exp(-0.5 * p.B(c.t[n + 1]));
    double acc = 0.0;
    visit_lam_nodes(p, c.t[n + 1], c.t[n], [&](double wl, double lam, double u) { acc -= wl * a1 * std::exp(-lam) * w(u); });
    return diag(acc, acc);
  }
  return integrate(p, c.t[n + 1], c.t[n], c.S[n + 1], [&](double u, double, const M2& Psi, const M2& Su) {
    return (-0.5 * p.beta(u) * w(u)) * (Psi * p.D * factor(p, Su).Linvt);
  });
}

void method_ddim(const Ctx& c, Table& tab) {
  const Process& p = c.p;
  for (int n = 0; n < c.N(); ++n) {
    const double t = c.t[n], t1 = c.t[n + 1], b = p.B(t), b1 = p.B(t1);
    const M2 Q = p.aug ? weighted_Q(c, n, [](double) { return 1.0; }) : diag(vp_ddim_q(b, b1), vp_ddim_q(b, b1));
    tab.emit(t, p.expA(b1 - b), M2{}, {Q});
  }
}

// lambda_ddim (conjugate integrator with constant B; options [lam, b], b = 0: B = lam I,
// b = 1: B = lam * ones(2, 2)). With U(t', u) = A_{t'}^{-1} A_u, the solution of
// dU/du = U (B - F_u), U(t', t') = I:
//   P = U(t', t) (I - h B),  Q = -int_{t'}^{t} U(t', u) 1/2 beta(u) D L_u^{-T} du.
// B = lam I commutes with F: U(t', u) = e^{lam (u - t')} Psi(t', u), and lam = 0 is ddim
// row for row (same code path). B = lam ones does not commute with F: U is exp((u - t') M)
// when beta is constant, exp of M on each knot interval for discrete schedules, and
// otherwise a fourth-order Magnus (two Gauss points, exponential of 2x2) march with
// substeps of at most 1/(512 ||M||) (docs/integrators.md).
struct Propagator {  // U(t', u) for increasing u, marched from t'
  const Process& p;
  M2 Bm;
  double u;
  M2 U = eye();
  M2 M(double v) const { return Bm - p.beta(v) * p.A; }
  void advance(double target) {
    while (u < target) {
      double e = target;
      if (!p.kt.empty()) {
        const auto k = std::upper_bound(p.kt.begin(), p.kt.end(), u);
        if (k != p.kt.end() && *k < e) e = *k;
        U = U * expm2((e - u) * M(0.5 * (u + e)));
        u = e;
        continue;
      }
      const double len = e - u;
      if (p.beta_min == p.beta_max) {
        U = U * expm2(len * M(u));
        u = e;
        continue;
      }
      const double bmax = std::max(p.beta(u), p.beta(e));
      const double normM = 2 * std::max(std::abs(Bm.a) + std::abs(Bm.b), std::abs(Bm.c) + std::abs(Bm.d)) +
                           bmax * 0.5 * p.normL;
      const int m = std::max(1, static_cast<int>(std::ceil(512.0 * len * normM)));
      const double d = len / m, r = std::sqrt(3.0) / 6.0;
      for (int i = 0; i < m; ++i) {
        const double a = u + i * d;
        const M2 M1 = M(a + (0.5 - r) * d), M2_ = M(a + (0.5 + r) * d);
        const M2 Om = (0.5 * d) * (M1 + M2_) + (std::sqrt(3.0) / 12.0 * d * d) * (M1 * M2_ - M2_ * M1);
        U = U * expm2(Om);
      }
      u = e;
    }
  }
};

void method_lambda_ddim(const Ctx& c, Table& tab) {
  const Process& p = c.p;
  const double lam = c.opt[0], bopt = c.opt[1];
  TORCH_CHECK_VALUE(bopt == 0.0 || bopt == 1.0, "options: b must be 0 (lam * I) or 1 (lam * ones), got ", bopt);
  const bool ones = bopt == 1.0 && p.aug;  // for VP, ones(1, 1) = I
  for (int n = 0; n < c.N(); ++n) {
    const double t = c.t[n], t1 = c.t[n + 1], h = t - t1, b = p.B(t), b1 = p.B(t1);
    if (!ones) {
      const double g = std::exp(lam * h) * (1.0 - h * lam);
      M2 Q;
      if (lam == 0.0 && !p.aug) {
        Q = diag(vp_ddim_q(b, b1), vp_ddim_q(b, b1));
      } else {
        Q = weighted_Q(c, n, [&](double u) { return lam == 0.0 ? 1.0 : std::exp(lam * (u - t1)); });
      }
      tab.emit(t, g * p.expA(b1 - b), M2{}, {Q});
      continue;
    }
    const M2 Bm{lam, lam, lam, lam};
    Propagator prop{p, Bm, t1};
    const M2 Q = integrate(p, t1, t, c.S[n + 1], [&](double u, double, const M2&, const M2& Su) {
      prop.advance(u);
      return (-0.5 * p.beta(u)) * (prop.U * p.D * factor(p, Su).Linvt);
    });
    prop.advance(t);
    tab.emit(t, prop.U * (eye() - h * Bm), M2{}, {Q});
  }
}

// sddim (VP only; option [eta]): DDIM with sigma_eta^2 = eta^2 (1 - a'^2)/(1 - a^2) (1 - a^2/a'^2)
// (a = sqrt(alphas_cumprod) = e^{-B/2}, a' at t'):
//   x' = (a'/a) x + (sqrt(1 - a'^2 - sigma_eta^2) - a' s / a) eps + sigma_eta xi.
// With c = -expm1(B' - B) = 1 - a^2/a'^2, s^2 = -expm1(-B), s'^2 = -expm1(-B'),
// sigma_eta^2 = eta^2 c s'^2 / s^2 (<= s'^2 since c <= s^2), and the Q numerator
// s'^2 - sigma_eta^2 - a'^2 s^2 / a^2 = -expm1(B - B') - eta^2 c s'^2 / s^2 has no cancellation.
void method_sddim(const Ctx& c, Table& tab) {
  const Process& p = c.p;
  TORCH_CHECK_VALUE(!p.aug, "method 'sddim' is defined for VP only (use 'em' for phase-space processes)");
  const double eta = c.opt[0];
  TORCH_CHECK_VALUE(eta >= 0.0 && eta <= 1.0, "options: eta must lie in [0, 1], got ", eta);
  for (int n = 0; n < c.N(); ++n) {
    const double t = c.t[n], b = p.B(t), b1 = p.B(c.t[n + 1]);
    const double cc = -std::expm1(b1 - b), s1sq = -std::expm1(-b1), ssq = -std::expm1(-b);
    const double ratio = std::exp(0.5 * (b - b1));  // a'/a
    const double num = -std::expm1(b - b1) - eta * eta * cc * s1sq / ssq;
    const double den = std::sqrt(s1sq * (1.0 - eta * eta * cc / ssq)) + ratio * std::sqrt(ssq);
    const double sig = eta * std::sqrt(s1sq / ssq * cc);
    tab.emit(t, diag(ratio, ratio), diag(sig, 0.0), {diag(num / den, 0.0)});
  }
}

double nsr(const Process& p, double b);

// conj_ms (options [k, corrector, interp, lower_final, predict], k = 1, 2, 3): B = 0 with eps over [t', t] replaced by the
// Lagrange polynomial in t through the last kk = min(k, n + 1) model outputs at t_n, ...:
//   P = Psi(t', t),  Q_j = -int_{t'}^{t} Psi(t', u) 1/2 beta(u) D L_u^{-T} l_j(u) du.
// corrector (0 "none", 1 "start", 2 "every"): once eps_{m+1} is known, step m's
// extrapolated eps can be replaced by the polynomial through eps_{m+1} and the previous
// outputs (Adams-Moulton in the exponential frame). The difference D_m (a combination of
// eps_{m+1}, eps_m, eps_{m-1}) is linear, so row m + 1 carries it as Psi(t_{m+2}, t_{m+1}) D_m:
// no extra model call, no new kernel. "start" corrects step 0 only (2 points; restores
// order k = 3 on PSLD/CLD, whose first-step O(h^2) error otherwise caps it at 2); "every"
// corrects every step with min(k + 1, m + 2) points (order k + 1; needs k <= 2, since the
// correction reads k + 1 outputs and a row holds 3); 3 "inner" is "every" without carrying the
// last correction into the denoising row. interp (0 "t", 1 "logsnr", 2 "sigma", 3 "flow", 4 "flow2"):
// the variable the polynomials are in: t, log r(B(u)), r(B(u)), s = r/(1 + r) or s^2, with
// r = L11/Psi00 the x-marginal noise-to-signal ratio (VP: sigma/alpha, the VE sigma; log r is
// minus DPM-Solver's lambda; polynomials in r are DEIS's rhoAB; s is the sigma of the flow-matching
// path with the same SNR, x = (1 - s) x0 + s eps, and x0_hat = x(0) + O(s^2) along the ODE, hence
// s^2; docs/integrators.md §8). predict (0 "eps", 1 "x0", VP only): the history holds
// eps, or the data predictions x0_hat = (z - sigma eps)/alpha, and the step is the exponential
// integrator in that frame, z' = (sigma'/sigma) z + sigma' int e^lambda x0_hat(lambda) dlambda
// (DPM-Solver++'s multistep with these nodes; docs/integrators.md §3). docs/integrators.md §3, conj_ms.
void method_conj_ms(const Ctx& c, Table& tab) {
  const double kopt = c.opt[0], copt = c.opt[1];
  TORCH_CHECK_VALUE(c.opt[2] == 0.0 || c.opt[2] == 1.0 || c.opt[2] == 2.0 || c.opt[2] == 3.0 || c.opt[2] == 4.0,
                    "options: interp must be 0 (t), 1 (logsnr), 2 (sigma), 3 (flow) or 4 (flow2)");
  TORCH_CHECK_VALUE(copt == 0.0 || copt == 1.0 || copt == 2.0 || copt == 3.0,
                    "options: corrector must be 0 (none), 1 (start), 2 (every) or 3 (inner)");
  TORCH_CHECK_VALUE(kopt == 1.0 || kopt == 2.0 || kopt == 3.0, "options: k must be 1, 2 or 3, got ", kopt);
  const int k = static_cast<int>(kopt), corr = static_cast<int>(copt);
  TORCH_CHECK_VALUE(c.opt[3] == 0.0 || c.opt[3] == 1.0, "options: lower_final must be 0 (no) or 1 (yes)");
  const bool lower_final = c.opt[3] == 1.0;
  TORCH_CHECK_VALUE(c.opt[4] == 0.0 || c.opt[4] == 1.0, "options: predict must be 0 (eps) or 1 (x0)");
  const bool x0 = c.opt[4] == 1.0;
  TORCH_CHECK_VALUE(!x0 || !c.p.aug, "options: predict='x0' is defined for VP only");
  tab.x0_history = x0;
  const int rows = c.N() + (c.denoise ? 1 : 0);
  TORCH_CHECK_VALUE(corr < 2 || k <= 2, "options: corrector='every' needs k <= 2 (its correction reads k + 1 "
                    "past outputs and a table row holds 3), got k = ", k);
  const int interp = static_cast<int>(c.opt[2]);  // interpolation variable: t, log r or r (r = noise/signal)
  auto var = [&](double u) {
    if (interp == 0) return u;
    const double r = nsr(c.p, c.p.B(u));
    TORCH_CHECK_VALUE(r > 0 && std::isfinite(r), "options: interp='logsnr' or 'sigma' needs the signal "
                      "coefficient Psi_00 > 0 on [t_eps, T], and it changes sign for this process; use interp='t'");
    const double f = r / (1.0 + r);
    return interp == 1 ? std::log(r) : interp == 2 ? r : interp == 3 ? f : f * f;
  };
  // All Lagrange-weighted integrals of step n in one pass over the quadrature nodes: basis j of
  // the polynomial (in var) through t_top, t_{top-1}, ... (cnt points), for the predictor
  // (top = n) and the corrector (top = n + 1). Each node's Psi D L^{-T} is computed once.
  struct Basis { int top, cnt, j; };
  auto lagrange_Qs = [&](int n, const std::vector<Basis>& bases) {
    std::vector<std::array<double, 3>> node(bases.size());
    for (size_t q = 0; q < bases.size(); ++q)
      for (int m = 0; m < bases[q].cnt; ++m) node[q][m] = var(c.t[bases[q].top - m]);
    std::vector<M2> out(bases.size());
    const Process& p = c.p;
    const double s1 = std::sqrt(c.S[n + 1].a);  // sigma' (VP)
    auto add = [&](double weight, double u) {  // weight * l_j(var(u)) into every basis
      const double v = var(u);
      for (size_t q = 0; q < bases.size(); ++q) {
        double l = 1.0;
        const Basis& bs = bases[q];
        for (int m = 0; m < bs.cnt; ++m)
          if (m != bs.j) l *= (v - node[q][m]) / (node[q][bs.j] - node[q][m]);
        out[q].a += weight * l;
      }
    };
    if (x0 || (!p.aug && p.B(c.t[n + 1]) > 0.0)) {
      // VP: both histories are integrals in lam = -1/2 log(expm1 B) = -log(sigma/alpha) itself.
      // x0 history: Q_j = sigma' int_{lam_n}^{lam_{n+1}} e^lam l_j dlam; eps history:
      // Q_j = alpha' int_{rho_n}^{rho_{n+1}} l_j drho = -alpha' int_{lam_n}^{lam_{n+1}} e^-lam l_j dlam
      // (rho = sigma/alpha, DDIM's Q = alpha' (rho' - rho) for one point). In t the integrands
      // alpha beta / (2 sigma^3) and beta / (2 alpha sigma) are nearly singular on VE or flow knots
      // (visit_lam_nodes; on Karras sigmas down to 0.002 the one-point eps Q was 0.08 % off DDIM's).
      // docs/integrators.md §3, §4.
      const double a1 = std::exp(-0.5 * p.B(c.t[n + 1]));  // alpha' (VP)
      visit_lam_nodes(p, c.t[n + 1], c.t[n], [&](double wl, double lam, double u) {
        add(wl * (x0 ? s1 * std::exp(lam) : -a1 * std::exp(-lam)), u);
      });
      if (!x0)
        for (auto& q : out) q.d = q.a;  // VP's diagonal Q (the kernels read the x-x entry)
      return out;
    }
    visit_nodes(p, c.t[n + 1], c.t[n], c.S[n + 1], [&](double w, double u, double bu, const M2& Psi, const M2& Su) {
      // eps history: -1/2 beta l Psi(t', u) D L_u^{-T}
      const M2 base = Psi * p.D * factor(p, Su).Linvt;
      const double v = var(u), be = p.beta(u);
      for (size_t q = 0; q < bases.size(); ++q) {
        double l = 1.0;
        const Basis& bs = bases[q];
        for (int m = 0; m < bs.cnt; ++m)
          if (m != bs.j) l *= (v - node[q][m]) / (node[q][bs.j] - node[q][m]);
        out[q] = out[q] + w * ((-0.5 * be * l) * base);
      }
    });
    return out;
  };
  std::array<M2, 3> D{};  // correction of the previous step, on eps_n, eps_{n-1}, eps_{n-2}
  for (int n = 0; n < c.N(); ++n) {
    // lower_final: no more points than rows left (DPM-Solver's lower_order_final).
    const int kk = std::min(k, lower_final ? std::min(n + 1, rows - n) : n + 1);
    const double t = c.t[n];
    const int cnt = corr >= 2 ? std::min(k + 1, n + 2) : (corr == 1 && n == 0 && k >= 2 ? 2 : 0);
    std::vector<Basis> bases;
    for (int j = 0; j < kk; ++j) bases.push_back({n, kk, j});
    for (int j = 0; j < cnt; ++j) bases.push_back({n + 1, cnt, j});
    const std::vector<M2> Qs = lagrange_Qs(n, bases);
    std::array<M2, 3> Qp{};  // predictor: extrapolation through eps_n, ..., eps_{n-kk+1}
    for (int j = 0; j < kk; ++j) Qp[j] = Qs[j];
    // x0 history: the data-prediction exponential integrator (DPM-Solver++'s frame), P = sigma'/sigma
    const M2 P = x0 ? diag(std::sqrt(c.S[n + 1].a / c.S[n].a), 0.0) : c.p.expA(c.p.B(c.t[n + 1]) - c.p.B(t));
    tab.emit(t, P, M2{}, {Qp[0] + P * D[0], Qp[1] + P * D[1], Qp[2] + P * D[2]});
    // D of this step, applied by row n + 1: interpolation through eps_{n+1}, ... minus Qp.
    D = {};
    if (cnt > 0) {
      for (int j = 0; j < cnt; ++j) D[j] = Qs[kk + j];
      for (int j = 0; j < kk; ++j) D[j + 1] = D[j + 1] - Qp[j];
    }
  }
  // The last step's correction: applied by the denoising row, if there is one ("inner": not).
  if (corr != 3) tab.carry = D;
}

// Tweedie denoising at t_eps (one extra model call): the data mean E[x0 | z], and for phase
// space E[m0 | z] under m0 ~ N(0, kappa M). With a = Psi(t,0) e_x and z = a x0 + L eps:
//   x0_hat = (x - L11 eps_x) / Psi00,   m0_hat = kappa M (Psi e_m)^T L^{-T} eps.
void emit_denoise(const Ctx& c, Table& tab) {
  const Process& p = c.p;
  const double t = c.t.back();
  const M2 Psi = p.expA(p.B(t));
  const auto& D = tab.carry;
  if (tab.x0_history) {
    // the history already holds x0_hat of the last call: z' = x0_hat, plus the last step's pending
    // correction (conj_ms corrector) moved through x0_hat = (z - sigma eps)/alpha at fixed eps
    const M2 Pd = diag(1 / Psi.a, 0);
    tab.emit(t, M2{}, M2{}, {diag(1, 0) + Pd * D[0], Pd * D[1], Pd * D[2]});
    return;
  }
  const Factor f = factor(p, c.S.back());
  const double km = p.aug ? p.kappa / p.m_inv : 0.0;
  const M2 Q = p.aug ? M2{-f.L.a / Psi.a, 0.0, km * Psi.b * f.Linvt.a, km * (Psi.b * f.Linvt.b + Psi.d * f.Linvt.d)}
                     : diag(-f.L.a / Psi.a, 0);
  // z is first corrected by the last step's pending correction (conj_ms corrector), if any.
  const M2 Pd = diag(1 / Psi.a, 0);
  tab.emit(t, Pd, M2{}, {Q + Pd * D[0], Pd * D[1], Pd * D[2]});
}

// ----------------------------------------------------------------------------- splitting
// Splitting integrators for phase-space processes (docs/integrators.md §6). In the variable
// B (dB = beta dt) the reverse-time PF-ODE and reverse SDE split into an x-flow (m frozen) and
// an m-flow (x frozen); with s = -L^{-T} eps and c = 1/2 (ODE) or 1 (SDE):
//   x-flow: dx/dB = 1/2 (Gamma x - M^-1 m) + c Gamma s_x   [+ sqrt(Gamma) dW]
//   m-flow: dm/dB = 1/2 (x + nu m)        + c M nu s_m     [+ sqrt(M nu) dW]
// Every sub-step is an affine map z -> P z + R z_n + Q eps + noise (covariance C) with the
// model output eps (made at the state z_n) frozen; a row composes the sub-steps between two
// model calls. With `stat`, the score is split as s = -Lambda z + r, Lambda = diag(1, 1/M) the
// prior's precision: -c Gamma x and -c nu m join the linear part (for the SDE they turn the
// reverse-time expansion into friction) and the residual r = s(z_n) + Lambda z_n is frozen.
struct Aff {
  M2 P = eye(), Q, C, R;  // R: coefficient of z_n, the state the row's model call saw
  void then(const Aff& s) {  // apply s after *this
    P = s.P * P + s.R;
    Q = s.P * Q + s.Q;
    C = s.P * C * tr(s.P) + s.C;
  }
};

const M2 kEx = diag(1, 0), kEm = diag(0, 1);
inline double expm1_over(double a, double x) { return a == 0.0 ? x : std::expm1(a * x) / a; }  // int_0^x e^{ab} db

struct Split {
  const Process& p;
  bool stat = true;  // measured: without it the conjugate and stochastic variants lose the cancellation
  double M() const { return 1.0 / p.m_inv; }
  M2 DLinvt(double t) const { return p.D * factor(p, p.cov(p.B(t))).Linvt; }
  double rate_x(double c) const { return 0.5 * p.gamma - (stat ? c * p.gamma : 0.0); }
  double rate_m(double c) const { return 0.5 * p.nu - (stat ? c * p.nu : 0.0); }

  // Euler sub-steps over [lo, hi] with L^{-T} taken at te (the time of the model call).
  // fric = 0 leaves the diagonal linear term to an O step (stochastic splitting).
  Aff x_euler(double lo, double hi, double te, double c, double fric) const {
    const double db = p.B(hi) - p.B(lo);
    Aff a;
    a.P = {1 + fric * rate_x(c) * db, -0.5 * p.m_inv * db, 0, 1};
    if (stat) a.R = diag(c * p.gamma * db, 0);
    a.Q = (-c * db) * (kEx * DLinvt(te));
    return a;
  }
  Aff m_euler(double lo, double hi, double te, double c, double fric) const {
    const double db = p.B(hi) - p.B(lo);
    Aff a;
    a.P = {1, 0, 0.5 * db, 1 + fric * rate_m(c) * db};
    if (stat) a.R = diag(0, c * p.nu * db);
    a.Q = (-c * db) * (kEm * DLinvt(te));
    return a;
  }
  // Conjugate sub-steps: the flow's linear part (rate a) solved exactly, its score term
  // -c int_lo^hi beta(u) e^{a (B(u) - B(lo))} (D L_u^{-T} eps)_row du by quadrature; with
  // noise, the flow is solved exactly in distribution.
  M2 conj_Q(double lo, double hi, double a, const M2& E, double c) const {
    const double blo = p.B(lo);
    return integrate(p, lo, hi, p.cov(blo), [&](double u, double bu, const M2&, const M2& Su) {
      return (-c * p.beta(u) * std::exp(a * (bu - blo))) * (E * p.D * factor(p, Su).Linvt);
    });
  }
  Aff x_conj(double lo, double hi, double c, bool noise) const {
    const double db = p.B(hi) - p.B(lo), r = rate_x(c), w = expm1_over(r, db);
    Aff a;
    a.P = {std::exp(r * db), -0.5 * p.m_inv * w, 0, 1};
    if (stat) a.R = diag(c * p.gamma * w, 0);
    a.Q = p.gamma > 0 ? conj_Q(lo, hi, r, kEx, c) : M2{};
    if (noise) a.C = diag(p.gamma * expm1_over(2 * r, db), 0);
    return a;
  }
  Aff m_conj(double lo, double hi, double c, bool noise) const {
    const double db = p.B(hi) - p.B(lo), r = rate_m(c), w = expm1_over(r, db);
    Aff a;
    a.P = {1, 0, 0.5 * w, std::exp(r * db)};
    if (stat) a.R = diag(0, c * p.nu * w);
    a.Q = conj_Q(lo, hi, r, kEm, c);
    if (noise) a.C = diag(0, M() * p.nu * expm1_over(2 * r, db));
    return a;
  }
  // O: the diagonal linear terms and the noise, an OU flow solved exactly in distribution
  // (with stat: friction -Gamma/2, -nu/2, which keeps N(0, diag(1, M)) invariant); the
  // x-noise scaled by lam_s (sps).
  Aff o_exact(double lo, double hi, double lam_s) const {
    const double db = p.B(hi) - p.B(lo), rx = rate_x(1.0), rm = rate_m(1.0);
    Aff a;
    a.P = diag(std::exp(rx * db), std::exp(rm * db));
    a.C = diag(lam_s * lam_s * p.gamma * expm1_over(2 * rx, db), M() * p.nu * expm1_over(2 * rm, db));
    return a;
  }
  // sscs (stat): the linear part dz/dB = J A J z + sqrt(D) dW (J = diag(1, -1): A with its
  // coupling reversed) exactly in distribution, mean J e^{bA} J z, covariance J K(b) J; and an
  // Euler step of the residual score D r.
  Aff linear_exact(double lo, double hi) const {
    const double db = p.B(hi) - p.B(lo);
    const M2 J = diag(1, -1);
    Aff a;
    a.P = J * p.expA(db) * J;
    a.C = J * p.K(db) * J;
    return a;
  }
  Aff score_euler(double lo, double hi, double te) const {
    const double db = p.B(hi) - p.B(lo);
    Aff a;
    a.Q = (-db) * DLinvt(te);
    a.R = db * diag(p.gamma, p.nu);  // D Lambda
    return a;
  }
  double mid(double lo, double hi) const { return p.Binv(0.5 * (p.B(lo) + p.B(hi))); }
};

// Rows of a splitting method: rows[r] = (time of the model call, or NaN for a row that makes
// none, and its composed map). A map that must act before the first model call (the O or
// half linear step that opens a step) becomes a leading NaN row.
struct SplitRows {
  std::vector<std::pair<double, Aff>> rows;
  void call(double t) { rows.push_back({t, Aff{}}); }
  void add(const Aff& a) {
    if (rows.empty()) rows.push_back({std::numeric_limits<double>::quiet_NaN(), Aff{}});
    rows.back().second.then(a);
  }
  void emit(Table& tab) const {
    for (const auto& [t, a] : rows) tab.emit(t, a.P, chol_psd(a.C), {a.Q});
  }
};

int option_first(const Ctx& c) {
  const double f = c.opt[0];
  TORCH_CHECK_VALUE(f == 0.0 || f == 1.0, "options: first must be 0 (x-flow first) or 1 (m-flow first), got ", f);
  return static_cast<int>(f);
}

void build_split(const Ctx& c, Table& tab, const std::string& name) {
  const Process& p = c.p;
  TORCH_CHECK_VALUE(p.aug, "method '", name, "' splits position and momentum: it needs a phase-space process "
                    "(PSLD, CLD), not VP");
  const Split s{p};
  SplitRows R;
  const int N = c.N();
  for (int n = 0; n < N; ++n) {
    const double t = c.t[n], t1 = c.t[n + 1], tm = s.mid(t1, t);
    if (name == "nse" || name == "rse" || name == "cse") {
      const bool mfirst = option_first(c) == 1;
      for (int k = 0; k < 2; ++k) {
        const bool xflow = (k == 0) != mfirst;
        if (name == "nse" || k == 0) R.call(t);
        if (name == "cse") R.add(xflow ? s.x_conj(t1, t, 0.5, false) : s.m_conj(t1, t, 0.5, false));
        else R.add(xflow ? s.x_euler(t1, t, t, 0.5, 1) : s.m_euler(t1, t, t, 0.5, 1));
      }
    } else if (name == "nvv") {  // B/2, A, B/2, each after its own model call
      R.call(t); R.add(s.m_euler(tm, t, t, 0.5, 1));
      R.call(t); R.add(s.x_euler(t1, t, t, 0.5, 1));
      R.call(tm); R.add(s.m_euler(t1, tm, tm, 0.5, 1));
    } else if (name == "rvv") {
      R.call(t);
      R.add(s.m_euler(tm, t, t, 0.5, 1)); R.add(s.x_euler(t1, t, t, 0.5, 1)); R.add(s.m_euler(t1, tm, t, 0.5, 1));
    } else if (name == "cvv") {
      R.call(t);
      R.add(s.m_conj(tm, t, 0.5, false)); R.add(s.x_conj(t1, t, 0.5, false)); R.add(s.m_conj(t1, tm, 0.5, false));
    } else if (name == "noba" || name == "nbao") {
      if (name == "noba") R.add(s.o_exact(t1, t, 1.0));
      R.call(t); R.add(s.m_euler(t1, t, t, 1.0, 0));
      R.call(t); R.add(s.x_euler(t1, t, t, 1.0, 0));
      if (name == "nbao") R.add(s.o_exact(t1, t, 1.0));
    } else if (name == "nobab") {
      R.add(s.o_exact(t1, t, 1.0));
      R.call(t); R.add(s.m_euler(tm, t, t, 1.0, 0));
      R.call(t); R.add(s.x_euler(t1, t, t, 1.0, 0));
      R.call(tm); R.add(s.m_euler(t1, tm, tm, 1.0, 0));
    } else if (name == "roba" || name == "sps") {
      const double lam_s = name == "sps" ? c.opt[0] : 1.0;
      TORCH_CHECK_VALUE(lam_s >= 0.0 && lam_s <= 1.0, "options: lam_s must lie in [0, 1], got ", lam_s);
      R.call(t);
      R.add(s.o_exact(t1, t, lam_s)); R.add(s.m_euler(t1, t, t, 1.0, 0)); R.add(s.x_euler(t1, t, t, 1.0, 0));
    } else if (name == "cspss") {
      R.call(t);
      R.add(s.m_conj(tm, t, 1.0, true)); R.add(s.x_conj(t1, t, 1.0, true)); R.add(s.m_conj(t1, tm, 1.0, true));
    } else if (name == "sscs") {  // half linear step, score Euler step at the half-step state, half linear step
      if (n == 0) R.add(s.linear_exact(tm, t));
      R.call(tm); R.add(s.score_euler(t1, t, tm)); R.add(s.linear_exact(t1, tm));
      if (n + 1 < N) R.add(s.linear_exact(s.mid(c.t[n + 2], t1), t1));
    } else {
      TORCH_CHECK_VALUE(false, "unknown splitting method '", name, "'");
    }
  }
  R.emit(tab);
}

#define FASTINT_SPLIT(NAME) \
  void method_##NAME(const Ctx& c, Table& tab) { build_split(c, tab, #NAME); }
FASTINT_SPLIT(nse) FASTINT_SPLIT(nvv) FASTINT_SPLIT(rse) FASTINT_SPLIT(rvv) FASTINT_SPLIT(cse) FASTINT_SPLIT(cvv)
FASTINT_SPLIT(noba) FASTINT_SPLIT(nbao) FASTINT_SPLIT(nobab) FASTINT_SPLIT(roba) FASTINT_SPLIT(sps)
FASTINT_SPLIT(cspss) FASTINT_SPLIT(sscs)
#undef FASTINT_SPLIT

struct Method {
  const char* name;
  int history;      // K: eps_n, ..., eps_{n-K+1}
  int n_options;
  void (*build)(const Ctx&, Table&);
};
const Method kMethods[] = {
    {"euler", 1, 0, method_euler},
    {"em", 1, 0, method_em},
    {"ddim", 1, 0, method_ddim},
    {"lambda_ddim", 1, 2, method_lambda_ddim},
    {"sddim", 1, 1, method_sddim},
    {"conj_ms", 3, 5, method_conj_ms},
    {"nse", 1, 1, method_nse},     {"nvv", 1, 0, method_nvv},     {"rse", 1, 1, method_rse},
    {"rvv", 1, 0, method_rvv},     {"cse", 1, 1, method_cse},     {"cvv", 1, 0, method_cvv},
    {"noba", 1, 0, method_noba},   {"nbao", 1, 0, method_nbao},   {"nobab", 1, 0, method_nobab},
    {"roba", 1, 0, method_roba},   {"sps", 1, 1, method_sps},     {"cspss", 1, 0, method_cspss},
    {"sscs", 1, 0, method_sscs},
};

// ----------------------------------------------------------------------------- noise-to-signal ratio
// x-marginal noise-to-signal ratio r(b) = L11/Psi00 at B = b (VP: sigma/alpha).
double nsr(const Process& p, double b) {
  if (!p.aug) return std::sqrt(std::expm1(b));
  const M2 Psi = p.expA(b);
  return factor(p, p.cov(b)).L.a / Psi.a;
}

// The times of a table: float64 [N + 1], strictly decreasing, in (0, T] (docs/design.md, "Times"). Named
// grids are made in Python (fastint/grids.py); the op only reads the sequence.
std::vector<double> read_times(const at::Tensor& times, double T, bool denoise) {
  TORCH_CHECK_TYPE(times.scalar_type() == at::kDouble, "times must be a float64 tensor, got ", times.scalar_type());
  TORCH_CHECK_VALUE(times.dim() == 1, "times must be 1-D, got shape ", times.sizes());
  const int64_t n = times.numel();
  TORCH_CHECK_VALUE(n >= (denoise ? 1 : 2), "times must hold at least ", denoise ? 1 : 2,
                    " entries (the model times, then the final time), got ", n);
  TORCH_CHECK_VALUE(n <= 10000001, "times must hold at most 1e7 + 1 entries, got ", n);
  const auto v = times.to(at::kCPU).contiguous();
  const double* q = v.data_ptr<double>();
  std::vector<double> t(q, q + n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(t[i]) && t[i] > 0 && t[i] <= T, "times must lie in (0, T] with T = ", T,
                      ", got times[", i, "] = ", t[i]);
    if (i > 0)
      TORCH_CHECK_VALUE(t[i] < t[i - 1], "times must be strictly decreasing, got times[", i - 1, "] = ", t[i - 1],
                        " and times[", i, "] = ", t[i]);
  }
  return t;
}

// ----------------------------------------------------------------------------- input checks
void check_finite(const char* name, double v, double low, bool open) {
  TORCH_CHECK_VALUE(std::isfinite(v), "process: ", name, " must be finite, got ", v);
  TORCH_CHECK_VALUE(open ? v > low : v >= low, "process: ", name, " must be ", open ? "> " : ">= ", low, ", got ", v);
}

Process make_process(const at::Tensor& process, const at::Tensor& knots, double T) {
  TORCH_CHECK_TYPE(process.scalar_type() == at::kDouble, "process must be a float64 tensor, got ",
                   process.scalar_type());
  TORCH_CHECK_TYPE(knots.scalar_type() == at::kDouble, "knots must be a float64 tensor, got ", knots.scalar_type());
  TORCH_CHECK_VALUE(process.dim() == 1 && process.numel() == 8,
                    "process must be a 1-D tensor [kind, beta_min, beta_max, Gamma, nu, M^-1, kappa, jitter] of 8 "
                    "entries, got shape ", process.sizes());
  TORCH_CHECK_VALUE(knots.dim() == 2 && knots.size(1) == 2, "knots must have shape [K, 2] (rows t_i, B(t_i)), got ",
                    knots.sizes());
  TORCH_CHECK_VALUE(std::isfinite(T) && T > 0, "T must be finite and > 0, got ", T);
  const auto v = process.to(at::kCPU).contiguous();
  const double* q = v.data_ptr<double>();
  Process p;
  TORCH_CHECK_VALUE(q[0] == 0.0 || q[0] == 1.0, "process: kind must be 0 (VP) or 1 (phase space), got ", q[0]);
  p.aug = q[0] == 1.0;
  p.T = T;
  p.beta_min = q[1];
  p.beta_max = q[2];
  const auto kn = knots.to(at::kCPU).contiguous();
  const int64_t K = kn.size(0);
  if (K == 0) {
    check_finite("beta_min", p.beta_min, 0, false);
    check_finite("beta_max", p.beta_max, 0, false);
    TORCH_CHECK_VALUE(p.beta_min + p.beta_max > 0, "process: beta_min and beta_max must not both be 0");
  } else {
    TORCH_CHECK_VALUE(K >= 2, "knots must have at least 2 rows, got ", K);
    const double* k = kn.data_ptr<double>();
    for (int64_t i = 0; i < K; ++i) {
      p.kt.push_back(k[2 * i]);
      p.kB.push_back(k[2 * i + 1]);
      TORCH_CHECK_VALUE(std::isfinite(k[2 * i]) && std::isfinite(k[2 * i + 1]), "knots must be finite");
      if (i > 0)
        TORCH_CHECK_VALUE(p.kt[i] > p.kt[i - 1] && p.kB[i] > p.kB[i - 1],
                          "knots must be strictly increasing in t and in B (row ", i, ")");
    }
    TORCH_CHECK_VALUE(p.kt.front() == 0 && p.kB.front() == 0, "knots must start at (t, B) = (0, 0)");
    TORCH_CHECK_VALUE(p.kt.back() == T, "knots must end at t = T = ", T, ", got ", p.kt.back());
  }
  p.A = diag(-0.5, -0.5);
  p.D = eye();
  if (p.aug) {
    p.gamma = q[3]; p.nu = q[4]; p.m_inv = q[5]; p.kappa = q[6]; p.jitter = q[7];
    check_finite("Gamma", p.gamma, 0, false);
    check_finite("nu", p.nu, 0, true);
    check_finite("M^-1", p.m_inv, 0, true);
    check_finite("kappa", p.kappa, 0, false);
    check_finite("jitter", p.jitter, 0, false);
    TORCH_CHECK_VALUE(p.jitter > 0 || p.gamma > 0 || p.kappa > 0,
                      "process: jitter must be > 0 when Gamma == 0 and kappa == 0");
    p.A = {-0.5 * p.gamma, 0.5 * p.m_inv, -0.5, -0.5 * p.nu};
    p.D = diag(p.gamma, p.nu / p.m_inv);
    p.S0 = diag(0.0, p.kappa / p.m_inv);
  }
  p.normL = 2 * std::max(std::abs(p.A.a) + std::abs(p.A.b), std::abs(p.A.c) + std::abs(p.A.d));
  return p;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> coefficients(const at::Tensor& process, const at::Tensor& knots, double T,
                                                c10::string_view method, const at::Tensor& times, bool denoise,
                                                at::ArrayRef<double> options) {
  const Process p = make_process(process, knots, T);
  const std::string mname(method.data(), method.size());
  const Method* m = nullptr;
  for (const Method& cand : kMethods)
    if (mname == cand.name) m = &cand;
  if (m == nullptr) {
    std::string names;
    for (const Method& cand : kMethods) names += std::string(names.empty() ? "'" : ", '") + cand.name + "'";
    TORCH_CHECK_VALUE(false, "method must be one of ", names, ", got '", mname, "'");
  }
  TORCH_CHECK_VALUE(static_cast<int>(options.size()) == m->n_options, "options: method '", mname, "' takes ",
                    m->n_options, " option(s), got ", options.size());
  for (double o : options) TORCH_CHECK_VALUE(std::isfinite(o), "options must be finite");

  const std::vector<double> t = read_times(times, T, denoise);
  // Single-threaded on purpose: a 1000-step table takes about a millisecond, less than
  // waking a thread pool that sampling may be using.
  std::vector<M2> S(t.size());
  for (size_t i = 0; i < t.size(); ++i) S[i] = p.cov(p.B(t[i]));
  std::vector<double> opt(options.begin(), options.end());
  const Ctx ctx{p, t, S, opt, denoise};
  Table tab{m->history, !p.aug, {}, {}};
  m->build(ctx, tab);
  if (denoise) emit_denoise(ctx, tab);

  const int64_t R = static_cast<int64_t>(tab.times.size()), W = tab.width();
  at::Tensor row_times = at::empty({R}, at::kDouble), table = at::empty({R, W}, at::kDouble);
  std::copy(tab.times.begin(), tab.times.end(), row_times.data_ptr<double>());
  std::copy(tab.rows.begin(), tab.rows.end(), table.data_ptr<double>());
  return {row_times, table};
}

// The C++ side of the method registry: "name:history:n_options" per method, ';'-separated.
// fastint/methods.py checks its specs against this list when the extension loads.
std::string methods() {
  std::string out;
  for (const Method& m : kMethods)
    out += std::string(out.empty() ? "" : ";") + m.name + ":" + std::to_string(m.history) + ":" +
           std::to_string(m.n_options);
  return out;
}

}  // namespace fastint

TORCH_LIBRARY_IMPL(fastint, CompositeExplicitAutograd, m) { m.impl("coefficients", &fastint::coefficients); }
