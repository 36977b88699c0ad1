// fasterase._C: turns torch tensors into the raw-pointer argument structs of kernels.h and picks the
// CPU or (when built WITH_CUDA) CUDA kernel by device. Inputs are validated in fasterase/ops; the
// checks here only guard against calling the extension directly with unusable tensors.
#include <torch/extension.h>
#include <torch/version.h>  // TORCH_VERSION_MAJOR/MINOR

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "kernels.h"

#ifdef WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace fasterase {
namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    case at::kByte: return kU8;
    default: TORCH_CHECK(false, "fasterase._C: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

void check(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "fasterase._C: ", name, " must be contiguous");
  TORCH_CHECK(t.device() == like.device(), "fasterase._C: ", name, " is on another device");
}

void check_fp32(const at::Tensor& t, const at::Tensor& like, const char* name) {
  check(t, like, name);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fasterase._C: ", name, " must be fp32, got ", t.scalar_type());
}

// The closed form's GEMM is specified in fp32 (fasterase/ops/rank_update.py), so its result must not depend
// on torch's switches for reduced-precision fp32 matmuls (torch.set_float32_matmul_precision,
// torch.backends.{cuda,mkldnn}.matmul.fp32_precision): TF32 in cuBLAS/cuBLASLt, bf16 or TF32 in oneDNN
// on CPUs that have them. at::NoTF32Guard is torch's own override, thread-local, but only the cuBLAS path
// reads it (cuBLASLt's reads the CUDA backend's precision). So each backend's process-wide setting is
// made IEEE for the call and put back afterwards; only when it is not IEEE already, so the usual call
// writes nothing (a matmul of another thread in that window would run in IEEE fp32: more precise, never
// less). Torch before 2.10 has only the older switch, float32_matmul_precision ("medium" lets oneDNN use
// bf16), handled the same way.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 10)
class IeeeMatmul {  // one backend's fp32 matmul precision IEEE for this object's life
 public:
  explicit IeeeMatmul(at::Float32Backend backend) : backend_(backend) {
    using at::Float32Backend;
    using at::Float32Op;
    using at::Float32Precision;
    auto& ctx = at::globalContext();
    saved_ = ctx.float32Precision(backend, Float32Op::MATMUL);
    Float32Precision effective = saved_;  // "none" defers to the backend's setting, then the generic one
    if (effective == Float32Precision::NONE) effective = ctx.float32Precision(backend, Float32Op::ALL);
    if (effective == Float32Precision::NONE) effective = ctx.float32Precision(Float32Backend::GENERIC, Float32Op::ALL);
    changed_ = effective != Float32Precision::NONE && effective != Float32Precision::IEEE;
    if (changed_) ctx.setFloat32Precision(backend, Float32Op::MATMUL, Float32Precision::IEEE);
  }
  ~IeeeMatmul() {
    if (changed_) at::globalContext().setFloat32Precision(backend_, at::Float32Op::MATMUL, saved_);
  }
  IeeeMatmul(const IeeeMatmul&) = delete;
  IeeeMatmul& operator=(const IeeeMatmul&) = delete;

 private:
  at::Float32Backend backend_;
  at::Float32Precision saved_;
  bool changed_ = false;
};

class Fp32MatmulGuard {
 public:
  Fp32MatmulGuard() : mkldnn_(at::Float32Backend::MKLDNN), cuda_(at::Float32Backend::CUDA) {}

 private:
  at::NoTF32Guard no_tf32_;
  IeeeMatmul mkldnn_, cuda_;
};
#else
class Fp32MatmulGuard {
 public:
  Fp32MatmulGuard() : saved_(at::globalContext().float32MatmulPrecision()) {
    changed_ = saved_ != at::Float32MatmulPrecision::HIGHEST;
    if (changed_) at::globalContext().setFloat32MatmulPrecision("highest");
  }
  ~Fp32MatmulGuard() {
    if (changed_)
      at::globalContext().setFloat32MatmulPrecision(saved_ == at::Float32MatmulPrecision::HIGH ? "high" : "medium");
  }
  Fp32MatmulGuard(const Fp32MatmulGuard&) = delete;
  Fp32MatmulGuard& operator=(const Fp32MatmulGuard&) = delete;

 private:
  at::NoTF32Guard no_tf32_;
  at::Float32MatmulPrecision saved_;
  bool changed_ = false;
};
#endif

template <typename T>
T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

#ifdef WITH_CUDA
void* stream_of(const at::Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.device().index()).stream(); }

at::Tensor pointer_table(const std::vector<at::Tensor>& ts, const at::Device& device) {
  std::vector<int64_t> ptrs;
  for (const auto& t : ts) ptrs.push_back(reinterpret_cast<int64_t>(t.data_ptr()));
  return torch::tensor(ptrs, torch::kInt64).to(device);
}
#endif

AdamWArgs adamw_args(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                     const at::Tensor& exp_avg_sq, const at::Tensor& step, const at::Tensor& found_inf,
                     const c10::optional<at::Tensor>& mask_bits, const c10::optional<at::Tensor>& mask_idx,
                     const c10::optional<at::Tensor>& absmax_m, const c10::optional<at::Tensor>& absmax_v,
                     const c10::optional<at::Tensor>& qmap_m, const c10::optional<at::Tensor>& qmap_v, double lr,
                     double beta1, double beta2, double eps, double weight_decay) {
  for (auto* t : {&grad, &exp_avg, &exp_avg_sq, &step, &found_inf}) check(*t, param, "tensor");
  TORCH_CHECK(grad.numel() == param.numel(), "fasterase._C: grad and param sizes differ");
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kFloat, "fasterase._C: step must be one fp32 element");
  AdamWArgs a{};
  a.param = param.data_ptr();
  a.grad = grad.data_ptr();
  a.exp_avg = exp_avg.data_ptr();
  a.exp_avg_sq = exp_avg_sq.data_ptr();
  a.step = step.data_ptr<float>();
  a.found_inf = found_inf.data_ptr<float>();
  a.mask_bits = ptr_or_null<const uint8_t>(mask_bits);
  a.mask_idx = ptr_or_null<const int32_t>(mask_idx);
  a.absmax_m = ptr_or_null<float>(absmax_m);
  a.absmax_v = ptr_or_null<float>(absmax_v);
  a.qmap_m = ptr_or_null<const float>(qmap_m);
  a.qmap_v = ptr_or_null<const float>(qmap_v);
  a.n = param.numel();
  a.length = exp_avg.numel();
  a.param_dtype = dtype_code(param);
  a.grad_dtype = dtype_code(grad);
  a.state_dtype = dtype_code(exp_avg);
  TORCH_CHECK(a.state_dtype != kU8 || a.length == 0 || (a.absmax_m && a.absmax_v && a.qmap_m && a.qmap_v),
              "fasterase._C: 8-bit states need absmax and qmap tensors");
  a.lr = lr;
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  return a;
}

#ifdef WITH_CUDA
// The CUDA form of both AdamW entry points: orders the tensors by dtypes into launch groups, numbers
// their state blocks and check chunks, and sends the task table through pinned memory (an
// asynchronous copy; the caching allocators keep both buffers until the stream has used them).
void masked_adamw_tasks_cuda(const std::vector<AdamWArgs>& args, const at::Tensor& found_inf, bool selected_only,
                             const c10::optional<at::Tensor>& qmap_m, const c10::optional<at::Tensor>& qmap_v) {
  if (args.empty()) return;
  const c10::cuda::CUDAGuard guard(found_inf.device());  // launch on the tensors' GPU, not the current one
  auto key = [&](size_t k) { return (args[k].param_dtype * 4 + args[k].grad_dtype) * 4 + args[k].state_dtype; };
  std::vector<size_t> order(args.size());
  std::iota(order.begin(), order.end(), size_t{0});
  std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return key(x) < key(y); });
  const int64_t count = static_cast<int64_t>(args.size()), bytes = count * static_cast<int64_t>(sizeof(AdamWTask));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  AdamWTask* tasks = reinterpret_cast<AdamWTask*>(host.data_ptr());
  std::vector<AdamWGroup> groups;
  int64_t chunks = 0;
  for (int64_t pos = 0; pos < count; ++pos) {
    const AdamWArgs& a = args[order[pos]];
    if (pos == 0 || key(order[pos]) != key(order[pos - 1]))
      groups.push_back(AdamWGroup{pos, pos, 0, a.param_dtype, a.grad_dtype, a.state_dtype});
    AdamWGroup& g = groups.back();
    tasks[pos] = AdamWTask{a, g.blocks, chunks, 0.f, 0.f, 0.f};
    g.end = pos + 1;
    g.blocks += (a.length + 255) / 256;
    chunks += ((selected_only ? a.length : a.n) + kAdamWCheckChunk - 1) / kAdamWCheckChunk;
  }
  at::Tensor table = at::empty({bytes}, found_inf.options().dtype(at::kByte));
  table.copy_(host, /*non_blocking=*/true);
  masked_adamw_cuda(reinterpret_cast<AdamWTask*>(table.data_ptr()), count, groups.data(),
                    static_cast<int64_t>(groups.size()), chunks, selected_only, found_inf.data_ptr<float>(),
                    ptr_or_null<const float>(qmap_m), ptr_or_null<const float>(qmap_v), stream_of(found_inf));
  C10_CUDA_KERNEL_LAUNCH_CHECK();  // each launch is checked in the .cu as well; this one covers the table copy too
}
#endif

void masked_adamw(at::Tensor param, at::Tensor grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                  at::Tensor step, at::Tensor found_inf, c10::optional<at::Tensor> mask_bits,
                  c10::optional<at::Tensor> mask_idx, c10::optional<at::Tensor> absmax_m,
                  c10::optional<at::Tensor> absmax_v, c10::optional<at::Tensor> qmap_m,
                  c10::optional<at::Tensor> qmap_v, double lr, double beta1, double beta2, double eps,
                  double weight_decay) {
  const AdamWArgs a = adamw_args(param, grad, exp_avg, exp_avg_sq, step, found_inf, mask_bits, mask_idx, absmax_m,
                                 absmax_v, qmap_m, qmap_v, lr, beta1, beta2, eps, weight_decay);
  if (param.is_cuda()) {
#ifdef WITH_CUDA
    masked_adamw_tasks_cuda({a}, found_inf, /*selected_only=*/true, qmap_m, qmap_v);
    return;
#endif
    TORCH_CHECK(false, "fasterase._C was built without CUDA");
  }
  masked_adamw_cpu(a);
}

// The list form: one check over every gradient, then the update of all tensors (fasterase/ops/adamw.py
// masked_adamw_multi); on CUDA in three launches in all (csrc/cuda/masked_adamw.cu).
void masked_adamw_multi(std::vector<at::Tensor> params, std::vector<at::Tensor> grads,
                        std::vector<at::Tensor> exp_avgs, std::vector<at::Tensor> exp_avg_sqs,
                        std::vector<at::Tensor> steps, at::Tensor found_inf,
                        std::vector<c10::optional<at::Tensor>> mask_bits,
                        std::vector<c10::optional<at::Tensor>> mask_idx,
                        std::vector<c10::optional<at::Tensor>> absmax_m,
                        std::vector<c10::optional<at::Tensor>> absmax_v, c10::optional<at::Tensor> qmap_m,
                        c10::optional<at::Tensor> qmap_v, std::vector<double> lrs, std::vector<double> beta1s,
                        std::vector<double> beta2s, std::vector<double> epss, std::vector<double> weight_decays) {
  const size_t count = params.size();
  for (size_t size : {grads.size(), exp_avgs.size(), exp_avg_sqs.size(), steps.size(), mask_bits.size(),
                      mask_idx.size(), absmax_m.size(), absmax_v.size(), lrs.size(), beta1s.size(), beta2s.size(),
                      epss.size(), weight_decays.size()})
    TORCH_CHECK(size == count, "fasterase._C: masked_adamw_multi needs one entry per tensor in every list");
  TORCH_CHECK(found_inf.is_contiguous() && found_inf.numel() == 1 && found_inf.scalar_type() == at::kFloat,
              "fasterase._C: masked_adamw_multi needs one fp32 found_inf element");
  std::vector<AdamWArgs> args;
  args.reserve(count);
  for (size_t k = 0; k < count; ++k) {
    TORCH_CHECK(params[k].device() == found_inf.device(), "fasterase._C: masked_adamw_multi runs on one device");
    args.push_back(adamw_args(params[k], grads[k], exp_avgs[k], exp_avg_sqs[k], steps[k], found_inf, mask_bits[k],
                              mask_idx[k], absmax_m[k], absmax_v[k], qmap_m, qmap_v, lrs[k], beta1s[k], beta2s[k],
                              epss[k], weight_decays[k]));
  }
  if (found_inf.is_cuda()) {
#ifdef WITH_CUDA
    masked_adamw_tasks_cuda(args, found_inf, /*selected_only=*/false, qmap_m, qmap_v);
    return;
#endif
    TORCH_CHECK(false, "fasterase._C was built without CUDA");
  }
  masked_adamw_multi_cpu(args.data(), static_cast<int64_t>(count), found_inf.data_ptr<float>());
}

void lowrank_update(std::vector<at::Tensor> weights, at::Tensor left, at::Tensor right) {
  TORCH_CHECK(!weights.empty(), "fasterase._C: no weights");
  const at::Tensor& w0 = weights[0];
  TORCH_CHECK(w0.dim() == 2, "fasterase._C: weights must be 2-D (out x in), got ", w0.dim(), "-D");
  for (const auto& w : weights) {
    check(w, w0, "weight");
    TORCH_CHECK(w.sizes() == w0.sizes() && w.scalar_type() == w0.scalar_type(), "fasterase._C: one shape group per call");
  }
  check_fp32(left, w0, "left");
  check_fp32(right, w0, "right");
  const int64_t num_weights = static_cast<int64_t>(weights.size());
  TORCH_CHECK(left.sizes() == right.sizes(), "fasterase._C: left ", left.sizes(), " and right ", right.sizes(),
              " must have one shape");
  TORCH_CHECK(left.dim() == 2 || (left.dim() == 3 && left.size(0) == num_weights), "fasterase._C: left/right must be "
              "(k, in) shared or (", num_weights, ", k, in) per weight, got ", left.sizes());
  TORCH_CHECK(left.size(-1) == w0.size(1), "fasterase._C: left/right are ", left.size(-1), " wide, the weights ",
              w0.size(1));
  TORCH_CHECK(left.size(-2) >= 1 && left.size(-2) <= kMaxRank, "fasterase._C: k = ", left.size(-2),
              " rows of left/right; valid: 1 to ", kMaxRank);
  std::vector<void*> ptrs;
  for (auto& w : weights) ptrs.push_back(w.data_ptr());
  LowRankArgs a{};
  a.num_weights = static_cast<int64_t>(weights.size());
  a.rows = w0.size(0);
  a.cols = w0.size(1);
  a.k = left.size(-2);
  a.left = left.data_ptr<float>();
  a.right = right.data_ptr<float>();
  a.dtype = dtype_code(w0);
  a.per_weight = left.dim() == 3;
  if (w0.is_cuda()) {
#ifdef WITH_CUDA
    const c10::cuda::CUDAGuard guard(w0.device());
    at::Tensor table = pointer_table(weights, w0.device());
    a.weights = reinterpret_cast<void* const*>(table.data_ptr<int64_t>());
    TORCH_CHECK(a.rows * a.num_weights <= INT32_MAX, "fasterase._C: ", a.num_weights, " weights of ", a.rows,
                " rows exceed a CUDA grid (one block per row, at most 2^31 - 1)");
    lowrank_update_cuda(a, stream_of(w0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
#endif
    TORCH_CHECK(false, "fasterase._C was built without CUDA");
  }
  a.weights = ptrs.data();
  lowrank_update_cpu(a);
}

// The shared transform is applied with ATen's GEMM (BLAS on the CPU, cuBLAS on the GPU), which beats
// any hand-written GEMM; the fused part of the closed form is solving T once for all layers
// (fasterase/ops). On the GPU the group's weights are stacked into one (G * rows, cols) product, so a
// group is one GEMM however many layers it has, and written back with one multi-tensor copy.
void shared_matmul(std::vector<at::Tensor> weights, at::Tensor transform, std::vector<at::Tensor> addends) {
  TORCH_CHECK(!weights.empty(), "fasterase._C: no weights");
  TORCH_CHECK(addends.empty() || addends.size() == weights.size(), "fasterase._C: one addend per weight");
  const at::Tensor& w0 = weights[0];
  TORCH_CHECK(w0.dim() == 2, "fasterase._C: weights must be 2-D (out x in), got ", w0.dim(), "-D");
  for (const auto& w : weights) {
    check(w, w0, "weight");
    TORCH_CHECK(w.sizes() == w0.sizes() && w.scalar_type() == w0.scalar_type(),
                "fasterase._C: one shape group per call");
  }
  check_fp32(transform, w0, "transform");
  TORCH_CHECK(transform.dim() == 2 && transform.size(0) == w0.size(1) && transform.size(1) == w0.size(1),
              "fasterase._C: transform must be (in, in) = (", w0.size(1), ", ", w0.size(1), "), got ",
              transform.sizes());
  for (const auto& a : addends) {
    check_fp32(a, w0, "addend");
    TORCH_CHECK(a.sizes() == w0.sizes(), "fasterase._C: addends must be ", w0.sizes(), ", got ", a.sizes());
  }
  if (w0.numel() == 0) return;  // nothing to write; the stacked product's split would give one piece, not one a weight
  const Fp32MatmulGuard fp32_matmul;
  if (w0.is_cuda()) {
    std::vector<at::Tensor> rows;
    for (const auto& w : weights) rows.push_back(w.to(at::kFloat));
    at::Tensor out = at::mm(at::cat(rows, 0), transform);
    if (!addends.empty()) out.add_(at::cat(addends, 0));
    at::_foreach_copy_(weights, out.split(w0.size(0), 0));
    return;
  }
  for (size_t i = 0; i < weights.size(); ++i) {
    at::Tensor out = at::mm(weights[i].to(at::kFloat), transform);
    if (!addends.empty()) out.add_(addends[i]);
    weights[i].copy_(out);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> paired_noise_loss(
    at::Tensor pred_cond, c10::optional<at::Tensor> pred_uncond, at::Tensor teacher_cond,
    at::Tensor teacher_uncond, at::Tensor sign, at::Tensor weight, at::Tensor uncond_weight, double eta) {
  check(pred_cond, pred_cond, "pred_cond");
  TORCH_CHECK(pred_cond.dim() >= 1, "fasterase._C: predictions need a leading batch dimension");
  for (auto* t : {&teacher_cond, &teacher_uncond}) {
    check(*t, pred_cond, "teacher");
    TORCH_CHECK(t->sizes() == pred_cond.sizes(), "fasterase._C: teachers must have pred_cond's shape");
  }
  if (pred_uncond.has_value()) {
    check(*pred_uncond, pred_cond, "pred_uncond");
    TORCH_CHECK(pred_uncond->sizes() == pred_cond.sizes(), "fasterase._C: pred_uncond must have pred_cond's shape");
  }
  for (auto* t : {&sign, &weight, &uncond_weight}) {
    check_fp32(*t, pred_cond, "per-sample tensor");
    TORCH_CHECK(t->numel() == pred_cond.size(0), "fasterase._C: sign/weights need one entry per sample");
  }
  at::Tensor grad_c = at::empty_like(pred_cond);
  at::Tensor grad_u = pred_uncond.has_value() ? at::empty_like(*pred_uncond) : pred_cond.new_empty({0});
  PairedLossArgs a{};
  a.pred_cond = pred_cond.data_ptr();
  a.pred_uncond = pred_uncond.has_value() ? pred_uncond->data_ptr() : nullptr;
  a.teacher_cond = teacher_cond.data_ptr();
  a.teacher_uncond = teacher_uncond.data_ptr();
  a.sign = sign.data_ptr<float>();
  a.weight = weight.data_ptr<float>();
  a.uncond_weight = uncond_weight.data_ptr<float>();
  a.grad_cond = grad_c.data_ptr();
  a.grad_uncond = pred_uncond.has_value() ? grad_u.data_ptr() : nullptr;
  a.batch = pred_cond.size(0);
  a.per_sample = a.batch ? pred_cond.numel() / a.batch : 0;
  a.pred_dtype = dtype_code(pred_cond);
  a.teacher_dtype = dtype_code(teacher_cond);
  TORCH_CHECK(teacher_uncond.scalar_type() == teacher_cond.scalar_type(), "fasterase._C: teachers must share a dtype");
  a.uncond_dtype = pred_uncond.has_value() ? dtype_code(*pred_uncond) : a.pred_dtype;
  a.eta = static_cast<float>(eta);
  if (pred_cond.is_cuda()) {
#ifdef WITH_CUDA
    const c10::cuda::CUDAGuard guard(pred_cond.device());
    at::Tensor loss = at::empty({}, pred_cond.options().dtype(at::kFloat));
    const int64_t blocks = a.batch * paired_noise_loss_cuda_chunks(a.per_sample);
    TORCH_CHECK(blocks <= INT32_MAX, "fasterase._C: ", a.batch, " samples of ", a.per_sample,
                " elements exceed a CUDA grid (one block per sample chunk, at most 2^31 - 1)");
    at::Tensor partials = at::empty({blocks}, pred_cond.options().dtype(at::kFloat));
    a.partials = partials.data_ptr<float>();
    paired_noise_loss_cuda(a, loss.data_ptr<float>(), stream_of(pred_cond));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return {loss, grad_c, grad_u};
#endif
    TORCH_CHECK(false, "fasterase._C was built without CUDA");
  }
  const float loss = paired_noise_loss_cpu(a);
  return {at::scalar_tensor(loss, pred_cond.options().dtype(at::kFloat)), grad_c, grad_u};
}

}  // namespace
}  // namespace fasterase

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fasterase native kernels (C++ CPU, CUDA when built with it)";
  m.def("masked_adamw", &fasterase::masked_adamw);
  m.def("masked_adamw_multi", &fasterase::masked_adamw_multi);
  m.def("lowrank_update", &fasterase::lowrank_update);
  m.def("shared_matmul", &fasterase::shared_matmul);
  m.def("paired_noise_loss", &fasterase::paired_noise_loss);
#ifdef WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
}
