// SoftRas silhouettes without gradient on the CPU (models/native_silhouette.py builds
// and loads this file). The same values as models/mesh_renderer.sparse_soft_silhouette
// (within 2e-6): every face is evaluated on the pixels of its own box grown by the blur
// radius, meshes in parallel (each mesh owns its image: no atomics), and each pixel keeps
// the product of (1 - D_f) = sigmoid(d_f / sigma) instead of a sum of logs (one exp, no log;
// the silhouette is 1 - that product). A face farther than the blur radius from a pixel
// multiplies it by sigmoid(80) = 1 exactly in float, so the loop over a window has no
// branch and the compiler vectorises it (with its vector exp).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

void render_mesh(const float* xy, const int64_t* faces, int64_t num_faces, int64_t size, float sigma,
                 float blur, float* keep) {
  const float half = float(size) / 2.f;
  const float reach = std::sqrt(blur) * half;  // blur radius in pixels
  const float ndc2 = (2.f / float(size)) * (2.f / float(size));  // pixel^2 -> NDC^2
  const float inv_sigma = 1.f / sigma;
  std::fill(keep, keep + size * size, 1.f);
  for (int64_t f = 0; f < num_faces; ++f) {
    const int64_t* idx = faces + 3 * f;
    if (idx[0] < 0 || idx[1] < 0 || idx[2] < 0) continue;  // padding row
    float u[3], v[3];  // pixel units: u right, v down, pixel centres at i + 0.5
    for (int i = 0; i < 3; ++i) {
      u[i] = (1.f - xy[2 * idx[i]]) * half;
      v[i] = (1.f - xy[2 * idx[i] + 1]) * half;
    }
    const int64_t c0 = std::max<int64_t>(0, (int64_t)std::floor(std::min({u[0], u[1], u[2]}) - reach - 0.5f));
    const int64_t c1 = std::min<int64_t>(size - 1, (int64_t)std::floor(std::max({u[0], u[1], u[2]}) + reach - 0.5f));
    const int64_t r0 = std::max<int64_t>(0, (int64_t)std::floor(std::min({v[0], v[1], v[2]}) - reach - 0.5f));
    const int64_t r1 = std::min<int64_t>(size - 1, (int64_t)std::floor(std::max({v[0], v[1], v[2]}) + reach - 0.5f));
    float ex[3], ey[3], inv_len[3];
    for (int i = 0; i < 3; ++i) {
      const int j = (i + 1) % 3;
      ex[i] = u[j] - u[i];
      ey[i] = v[j] - v[i];
      inv_len[i] = 1.f / std::max(ex[i] * ex[i] + ey[i] * ey[i], 1e-12f);
    }
    for (int64_t row = r0; row <= r1; ++row) {
      const float py = float(row) + 0.5f;
      float* out = keep + row * size;
#pragma omp simd
      for (int64_t col = c0; col <= c1; ++col) {
        const float px = float(col) + 0.5f;
        float dist = 1e30f;
        int pos = 0, neg = 0;
        for (int i = 0; i < 3; ++i) {  // squared distance to the nearest edge, side of each edge
          const float rx = px - u[i], ry = py - v[i];
          const float t = std::min(1.f, std::max(0.f, (rx * ex[i] + ry * ey[i]) * inv_len[i]));
          const float dx = rx - t * ex[i], dy = ry - t * ey[i];
          dist = std::min(dist, dx * dx + dy * dy);
          const float side = rx * ey[i] - ry * ex[i];
          pos += side > 0.f;
          neg += side < 0.f;
        }
        const float d = dist * ndc2;
        const float signed_d = (pos == 3 || neg == 3) ? -d : d;  // negative inside the face
        const float x = signed_d < blur ? signed_d * inv_sigma : 80.f;
        out[col] *= 1.f / (1.f + std::exp(-x));
      }
    }
  }
  for (int64_t i = 0; i < size * size; ++i) keep[i] = 1.f - keep[i];
}

}  // namespace

// (B,S,S) silhouettes of NDC vertices xy (B,V,2) and faces (B,F,3) (-1 rows: padding).
torch::Tensor soft_silhouette(torch::Tensor xy, torch::Tensor faces, int64_t size, double sigma, double blur) {
  TORCH_CHECK(xy.device().is_cpu() && faces.device().is_cpu(), "soft_silhouette: CPU tensors only");
  TORCH_CHECK(xy.dim() == 3 && xy.size(2) == 2, "soft_silhouette: xy must be (B,V,2), got ", xy.sizes());
  TORCH_CHECK(faces.dim() == 3 && faces.size(2) == 3 && faces.size(0) == xy.size(0),
              "soft_silhouette: faces must be (B,F,3) with B = ", xy.size(0), ", got ", faces.sizes());
  TORCH_CHECK(size > 0 && sigma > 0 && blur > 0, "soft_silhouette: size, sigma and blur must be positive");
  const auto verts = xy.contiguous().to(torch::kFloat);
  const auto index = faces.contiguous().to(torch::kLong);
  const int64_t batch = verts.size(0), num_verts = verts.size(1), num_faces = index.size(1);
  auto out = torch::empty({batch, size, size}, verts.options());
  const float* xy_ptr = verts.data_ptr<float>();
  const int64_t* face_ptr = index.data_ptr<int64_t>();
  float* out_ptr = out.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      render_mesh(xy_ptr + b * num_verts * 2, face_ptr + b * num_faces * 3, num_faces, size, float(sigma),
                  float(blur), out_ptr + b * size * size);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("soft_silhouette", &soft_silhouette, "SoftRas silhouettes without gradient (CPU)");
}
