/* pidrt_trt_plugins: the TensorRT plugins pidrt::few_token and pidrt::dual_kv (IPluginV3, version
 * "1", namespace "pidrt"), the nodes `pidrt export --trt-plugins` writes, running pidrt_kernels.
 *
 * Three ways to load them, none needing Python:
 * - IPluginRegistry::loadLibrary("libpidrt_trt_plugins.so"), `trtexec --dynamicPlugins=...`, or
 *   serialised with a version-compatible engine (--setPluginsToSerialize): TensorRT calls the
 *   entry points getCreators and setLoggerFinder below.
 * - `trtexec --staticPlugins=libpidrt_trt_plugins_static.so`: that library registers both creators
 *   when it is loaded (a static initialiser calling initPidrtPlugins). Use one way per process:
 *   TensorRT refuses a creator that is registered twice.
 * - An application linking libpidrt_trt_plugins calls initPidrtPlugins itself, like
 *   initLibNvInferPlugins.
 */
#ifndef PIDRT_TRT_PLUGINS_H
#define PIDRT_TRT_PLUGINS_H

#ifdef __cplusplus
#include <NvInferRuntime.h>

extern "C" {
#define PIDRT_TRT_API __attribute__((visibility("default")))

/* Both plugin creators (what IPluginRegistry::loadLibrary registers). */
PIDRT_TRT_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators);
/* Where the plugins find TensorRT's logger for their error messages. */
PIDRT_TRT_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder);
/* Register both creators with getPluginRegistry() under "pidrt"; `logger` (an nvinfer1::ILogger*,
 * may be NULL) receives the plugins' errors. False if either was registered already. */
PIDRT_TRT_API bool initPidrtPlugins(void* logger);
}
#endif

#endif /* PIDRT_TRT_PLUGINS_H */
