// libpidrt_trt_plugins_static: registers pidrt's plugin creators when the library is loaded, for
// loaders that only dlopen it (`trtexec --staticPlugins`). A separate library because a plugin
// library that registers itself on load cannot also be loaded with IPluginRegistry::loadLibrary
// (TensorRT refuses creators that are registered already).
#include "pidrt/trt_plugins.h"

namespace {

struct RegisterOnLoad {
    RegisterOnLoad() { initPidrtPlugins(nullptr); }
};

RegisterOnLoad const gRegisterOnLoad;

}  // namespace
