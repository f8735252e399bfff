#include "cuda_device.hpp"

#include <cuda_runtime_api.h>

#include <string>

#include "errors.hpp"

namespace tstitch {

void cuda_check(int err, const char* what) {
  if (err == cudaSuccess) return;
  const cudaError_t e = static_cast<cudaError_t>(err);
  const tstitch_status s = e == cudaErrorMemoryAllocation ? TSTITCH_ERR_OUT_OF_MEMORY : TSTITCH_ERR_RUNTIME;
  fail(s, std::string(what) + " failed: " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")");
}

int cuda_device_count() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

namespace {

class CudaGraph : public Graph {
 public:
  CudaGraph(cudaGraph_t g, cudaGraphExec_t exec, cudaStream_t s) : graph_(g), exec_(exec), stream_(s) {}
  ~CudaGraph() override {
    cudaGraphExecDestroy(exec_);
    cudaGraphDestroy(graph_);
  }
  void launch() override { cuda_check(cudaGraphLaunch(exec_, stream_), "cudaGraphLaunch"); }

 private:
  cudaGraph_t graph_;
  cudaGraphExec_t exec_;
  cudaStream_t stream_;
};

class CudaDevice : public Device {
 public:
  explicit CudaDevice(int index) : index_(index) {
    int n = 0;
    const cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess)
      fail(TSTITCH_ERR_NO_DEVICE, std::string("no usable CUDA device (cudaGetDeviceCount: ") + cudaGetErrorName(err) +
                                      "); run on a machine with an NVIDIA GPU and driver");
    if (index < 0 || index >= n)
      fail(TSTITCH_ERR_NO_DEVICE, "CUDA device " + std::to_string(index) + " does not exist (" + std::to_string(n) +
                                      " visible); choose device_index in [0, " + std::to_string(n) + ")");
    cuda_check(cudaSetDevice(index), "cudaSetDevice");
    cuda_check(cudaDeviceGetAttribute(&cc_.first, cudaDevAttrComputeCapabilityMajor, index), "cudaDeviceGetAttribute");
    cuda_check(cudaDeviceGetAttribute(&cc_.second, cudaDevAttrComputeCapabilityMinor, index), "cudaDeviceGetAttribute");
    cuda_check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    if (cudaEventCreate(&start_) != cudaSuccess || cudaEventCreate(&end_) != cudaSuccess) {
      release();
      fail(TSTITCH_ERR_RUNTIME, "cudaEventCreate failed");
    }
  }
  ~CudaDevice() override { release(); }

  std::string describe() const override {
    cudaDeviceProp p{};
    cudaGetDeviceProperties(&p, index_);
    return std::string(p.name) + " (cuda:" + std::to_string(index_) + ")";
  }
  std::pair<int, int> compute_capability() const override { return cc_; }

  void* alloc(size_t nbytes, const std::string& what) override {
    void* p = nullptr;
    const cudaError_t err = cudaMalloc(&p, nbytes);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear the sticky-free error state of a failed allocation
      fail(TSTITCH_ERR_OUT_OF_MEMORY, "out of GPU memory allocating " + std::to_string(nbytes) + " B for " + what +
                                          " (" + cudaGetErrorName(err) + "); use a smaller batch");
    }
    return p;
  }
  void free(void* p) override { cudaFree(p); }
  void upload(void* dst, const void* host, size_t n) override {
    cuda_check(cudaMemcpyAsync(dst, host, n, cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync (upload)");
  }
  void copy(void* dst, const void* src, size_t n) override {
    cuda_check(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice, stream_), "cudaMemcpyAsync (device)");
  }
  void zero(void* dst, size_t n) override { cuda_check(cudaMemsetAsync(dst, 0, n, stream_), "cudaMemsetAsync"); }
  void download(void* host, const void* src, size_t n) override {
    cuda_check(cudaMemcpyAsync(host, src, n, cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync (download)");
    synchronize();
  }
  void synchronize() override { cuda_check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize"); }
  void* stream() override { return stream_; }

  double time_ms(const std::function<void()>& enqueue) override {
    cuda_check(cudaEventRecord(start_, stream_), "cudaEventRecord");
    enqueue();
    cuda_check(cudaEventRecord(end_, stream_), "cudaEventRecord");
    cuda_check(cudaEventSynchronize(end_), "cudaEventSynchronize");
    float ms = 0.0f;
    cuda_check(cudaEventElapsedTime(&ms, start_, end_), "cudaEventElapsedTime");
    return ms;
  }

  std::unique_ptr<Graph> capture(const std::function<void()>& body) override {
    cuda_check(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture");
    cudaGraph_t graph = nullptr;
    try {
      body();
    } catch (...) {
      cudaStreamEndCapture(stream_, &graph);  // leave capture mode before reporting
      if (graph) cudaGraphDestroy(graph);
      cudaGetLastError();
      throw;
    }
    const cudaError_t end = cudaStreamEndCapture(stream_, &graph);
    if (end != cudaSuccess) {
      if (graph) cudaGraphDestroy(graph);
      cudaGetLastError();
      cuda_check(end, "cudaStreamEndCapture");
    }
    cudaGraphExec_t exec = nullptr;
    const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
    if (inst != cudaSuccess) {
      cudaGraphDestroy(graph);
      cuda_check(inst, "cudaGraphInstantiate");
    }
    return std::make_unique<CudaGraph>(graph, exec, stream_);
  }

 private:
  void release() {
    if (start_) cudaEventDestroy(start_);
    if (end_) cudaEventDestroy(end_);
    if (stream_) cudaStreamDestroy(stream_);
    start_ = end_ = nullptr;
    stream_ = nullptr;
  }
  int index_;
  std::pair<int, int> cc_{0, 0};
  cudaStream_t stream_ = nullptr;
  cudaEvent_t start_ = nullptr, end_ = nullptr;
};

}  // namespace

std::unique_ptr<Device> make_cuda_device(int index) { return std::make_unique<CudaDevice>(index); }

}  // namespace tstitch
