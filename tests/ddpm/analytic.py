"""Analytic denoisers: for Gaussian data the optimal noise predictor is closed-form.

If x_0 ~ N(mu, s^2 I) then x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps is Gaussian with mean sqrt(ab) mu and variance
ab s^2 + 1 - ab per pixel, and Cov(eps, x_t) = sqrt(1 - ab), so the minimiser of E||eps - f(x_t)||^2 is

    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab).

A sampler driven by it must return samples with mean mu and standard deviation s.
"""


class GaussianEps:
    def __init__(self, schedule, mu: float, s: float):
        self.ab = schedule.alphas_cumprod
        self.mu, self.s = mu, s

    def __call__(self, x_t, t, y=None):
        ab = self.ab[t].to(x_t.dtype).reshape(-1, 1, 1, 1)
        return (1 - ab).sqrt() * (x_t - ab.sqrt() * self.mu) / (ab * self.s**2 + 1 - ab)
