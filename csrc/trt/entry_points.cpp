// The library's entry points (pidrt/trt_plugins.h) and where the plugins' errors go.
#include <atomic>

#include "pidrt/trt_plugins.h"
#include "plugins.h"

namespace pidrt::trt {
namespace {

std::atomic<nvinfer1::ILoggerFinder*> gFinder{nullptr};
std::atomic<nvinfer1::ILogger*> gLogger{nullptr};

Creator gFewToken(Op::few_token);
Creator gDualKv(Op::dual_kv);
nvinfer1::IPluginCreatorInterface* const gCreators[] = {&gFewToken, &gDualKv};

}  // namespace

void log_error(std::string const& message) {
    nvinfer1::ILoggerFinder* finder = gFinder.load();
    nvinfer1::ILogger* logger = finder != nullptr ? finder->findLogger() : gLogger.load();
    if (logger != nullptr) logger->log(nvinfer1::ILogger::Severity::kERROR, message.c_str());
}

}  // namespace pidrt::trt

extern "C" {

nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
    nbCreators = int32_t(sizeof(pidrt::trt::gCreators) / sizeof(pidrt::trt::gCreators[0]));
    return pidrt::trt::gCreators;
}

void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { pidrt::trt::gFinder.store(finder); }

bool initPidrtPlugins(void* logger) {
    if (logger != nullptr) pidrt::trt::gLogger.store(static_cast<nvinfer1::ILogger*>(logger));
    nvinfer1::IPluginRegistry* registry = getPluginRegistry();
    if (registry == nullptr) return false;
    bool ok = true;
    for (nvinfer1::IPluginCreatorInterface* creator : pidrt::trt::gCreators)
        ok = registry->registerCreator(*creator, pidrt::trt::kNamespace) && ok;
    if (!ok) pidrt::trt::log_error("initPidrtPlugins: a pidrt plugin creator was registered already");
    return ok;
}

}  // extern "C"
