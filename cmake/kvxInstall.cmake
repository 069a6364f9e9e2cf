# Install rules in the manner of {fmt}: exported targets, Config + Version
# files, the dependency finder, and components for the optional backends.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(kvx_cmake_dir ${CMAKE_INSTALL_DATADIR}/cmake/kvx)
set(kvx_install_targets kvx)
foreach(c ${kvx_components})
  list(APPEND kvx_install_targets kvx_${c})
endforeach()

install(TARGETS ${kvx_install_targets} EXPORT kvxTargets FILE_SET HEADERS DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(EXPORT kvxTargets NAMESPACE kvx:: DESTINATION ${kvx_cmake_dir})
configure_package_config_file(cmake/kvxConfig.cmake.in ${CMAKE_CURRENT_BINARY_DIR}/kvxConfig.cmake
                              INSTALL_DESTINATION ${kvx_cmake_dir})
write_basic_package_version_file(${CMAKE_CURRENT_BINARY_DIR}/kvxConfigVersion.cmake COMPATIBILITY SameMinorVersion
                                 ARCH_INDEPENDENT)
install(FILES ${CMAKE_CURRENT_BINARY_DIR}/kvxConfig.cmake ${CMAKE_CURRENT_BINARY_DIR}/kvxConfigVersion.cmake
              cmake/kvxDependencies.cmake DESTINATION ${kvx_cmake_dir})

# The command-line tools, when built here (KVX_BUILD_BENCHMARKS): the store's
# processes, the planner, the topology probe and the measuring CLIs, so a
# serving platform can package them beside the headers (`cmake --install
# BUILD --component tools`).
foreach(tool kvx-store kvx-plan kvx-topo transfer_bench store_bench trace_replay file_tier_bench ucx_bench)
  if(TARGET ${tool})
    install(TARGETS ${tool} RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT tools)
  endif()
endforeach()
