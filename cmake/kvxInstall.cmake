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
