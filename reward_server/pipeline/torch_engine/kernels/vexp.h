// exp on every lane of a vector, shared by attention.cpp and layers.cpp. Include it where `vf` (a
// GCC vector of floats), `vi` (the int32 vector of the same width) and `splat(float)` are defined.
//
// 2^n * p(r), r = x - n ln 2 in [-ln2/2, ln2/2], degree-6 polynomial (a few ulp), over fp32's whole
// range: inf above ln(FLT_MAX), as torch's exp (SiLU of a very negative gate is then -0, as torch's),
// and 2^n applied in two halves so that 2^128 x p(r) < FLT_MAX stays finite. The same operations on
// every lane, so a value's exp never depends on its neighbours.

inline vf vexp(vf x) {
  const vf top = splat(88.72283935546875f);  // ln(FLT_MAX), rounded down
  const vi over = x > top;
  x = x > splat(-87.0f) ? x : splat(-87.0f);
  x = x < top ? x : top;
  const vf shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const vf t = x * splat(1.44269504088896341f) + shifter;
  const vf n = t - shifter;
  vf r = x - n * splat(0.693359375f);
  r = r - n * splat(-2.12194440e-4f);
  vf p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * (r * r) + r + splat(1.0f);
  const vi whole = __builtin_convertvector(n, vi), low = whole >> 1, high = whole - low;
  const vf y = p * (vf)((low + 127) << 23) * (vf)((high + 127) << 23);
  return over ? splat(__builtin_inff()) : y;
}
