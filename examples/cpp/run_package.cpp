// Load the dtop op library and a model package, run one batch, print what came out.
//
//   run_package MODEL.pt2 LIBDTOP_OPS.so BATCH
//
// The input is a deterministic image batch, sin(0.001 * i) over the elements in order, so that
// a caller can rebuild it elsewhere and compare. Prints one line per output ("pred: shape ...
// sum ...", "exit_stage: shape ... counts ...").

#include <dlfcn.h>

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdio>
#include <cstdlib>
#include <iomanip>
#include <iostream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

// "3,96,96" -> {3, 96, 96}
std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> dims;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) dims.push_back(std::stoll(item));
  return dims;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: " << argv[0] << " MODEL.pt2 LIBDTOP_OPS.so BATCH\n";
    return 2;
  }
  const std::string package = argv[1], library = argv[2];
  const int64_t batch = std::atoll(argv[3]);

  // 1. The op library first: it registers the dtop:: ops the package's graph calls. Without it
  //    the loader fails with "Could not find schema for dtop::...".
  void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_GLOBAL);
  if (handle == nullptr) {
    std::cerr << "cannot load the op library " << library << ": " << dlerror() << "\n";
    return 1;
  }
  using VersionFn = const char* (*)();
  auto version = reinterpret_cast<VersionFn>(dlsym(handle, "dtop_ops_library_version"));

  // 2. The package, and the check that it was exported with this library.
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> owner;
  try {
    owner = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package);
  } catch (const c10::Error& e) {
    const std::string what = e.what_without_backtrace();
    std::cerr << "cannot load " << package << ": " << what << "\n";
    if (what.find("schema for dtop::") != std::string::npos)
      std::cerr << "the package calls an op that " << library << " does not define: load the op "
                << "library the package was exported with (dtop_kernels.ops_library_path())\n";
    return 1;
  }
  torch::inductor::AOTIModelPackageLoader& loader = *owner;
  auto meta = loader.get_metadata();
  const std::string wanted = meta["dtop_kernels.ops_library"];
  if (version == nullptr || wanted != version()) {
    std::cerr << "warning: " << package << " was exported with op library '" << wanted
              << "'; " << library << " is '" << (version ? version() : "?") << "'\n";
  }

  // 3. One batch.
  std::vector<int64_t> shape{batch};
  for (int64_t d : parse_shape(meta["dtop_kernels.image"])) shape.push_back(d);
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  at::Tensor img = at::arange(numel, at::kFloat).mul(0.001).sin().reshape(shape);
  std::vector<at::Tensor> outputs = loader.run({img});

  const at::Tensor& pred = outputs.at(0);
  std::cout << "pred: shape " << pred.sizes() << " sum " << std::setprecision(10)
            << pred.to(at::kDouble).sum().item<double>() << "\n";
  if (outputs.size() > 1) {
    const at::Tensor& stage = outputs.at(1);
    std::cout << "exit_stage: shape " << stage.sizes() << " counts";
    at::Tensor counts = at::bincount(stage.flatten());
    for (int64_t s = 0; s < counts.numel(); ++s) std::cout << " " << counts[s].item<int64_t>();
    std::cout << "\n";
  }
  return 0;
}
