# Install rules (included from the top-level CMakeLists.txt when DMAKIT_INSTALL).
#
#   <prefix>/lib*/libdmakit.so.<version>, .so.<major>, .so   component dmakit_runtime / dmakit_development
#   <prefix>/lib*/libdmakit.a                                dmakit_development
#   <prefix>/include/dmakit/*.h, *.hpp, version.h            dmakit_development
#   <prefix>/lib*/cmake/dmakit/                              dmakit_development (find_package(dmakit))
#   <prefix>/lib*/pkgconfig/dmakit.pc                        dmakit_development
#   <prefix>/share/dmakit/dmakit.toml                        dmakit_runtime (example configuration)
#   <prefix>/bin/dmakit                                      dmakit_tools (tools/CMakeLists.txt)
# lib* is CMAKE_INSTALL_LIBDIR (lib, lib64 or lib/<multiarch> on Debian).
include(CMakePackageConfigHelpers)

set(DMAKIT_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/dmakit)

install(TARGETS dmakit dmakit_static EXPORT dmakitTargets
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
          COMPONENT dmakit_runtime NAMELINK_COMPONENT dmakit_development
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT dmakit_development)

# Public headers: include/dmakit/ alone (never src/), plus the generated version.h.
file(GLOB dmakit_public_headers CONFIGURE_DEPENDS
  ${PROJECT_SOURCE_DIR}/include/dmakit/*.h ${PROJECT_SOURCE_DIR}/include/dmakit/*.hpp)
install(FILES ${dmakit_public_headers} ${DMAKIT_GENERATED_INCLUDE_DIR}/dmakit/version.h
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/dmakit COMPONENT dmakit_development)

# The settings file with every default, as an example: the tool and
# dmakit_ctx_create read a config only from where they are told (see README).
install(FILES ${PROJECT_SOURCE_DIR}/config/dmakit.toml
  DESTINATION ${CMAKE_INSTALL_DATADIR}/dmakit COMPONENT dmakit_runtime)

# CMake package: dmakit::dmakit (shared) and dmakit::dmakit_static.
install(EXPORT dmakitTargets NAMESPACE dmakit:: FILE dmakitTargets.cmake
  DESTINATION ${DMAKIT_INSTALL_CMAKEDIR} COMPONENT dmakit_development)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/dmakitConfig.cmake.in
  ${PROJECT_BINARY_DIR}/cmake/dmakitConfig.cmake
  INSTALL_DESTINATION ${DMAKIT_INSTALL_CMAKEDIR})
# 0.x: the SONAME is libdmakit.so.0, so every 0.y is one ABI line.
write_basic_package_version_file(${PROJECT_BINARY_DIR}/cmake/dmakitConfigVersion.cmake
  COMPATIBILITY SameMajorVersion)
install(FILES ${PROJECT_BINARY_DIR}/cmake/dmakitConfig.cmake
              ${PROJECT_BINARY_DIR}/cmake/dmakitConfigVersion.cmake
  DESTINATION ${DMAKIT_INSTALL_CMAKEDIR} COMPONENT dmakit_development)

# pkg-config: Cflags and Libs name dmakit alone; what libdmakit.a needs goes
# to Libs.private as plain flags (not Requires.private: pkg-config would add
# DPDK's -include rte_config.h -march=... to every consumer's --cflags).
# The file is written at install time so that it names the prefix actually
# installed to (cmake --install --prefix P).
set(dmakit_pc_libs_private ${DPDK_LDFLAGS} -lspdlog -lfmt -pthread -lstdc++ -lm)
list(JOIN dmakit_pc_libs_private " " dmakit_pc_libs_private)
set(dmakit_pc_file ${PROJECT_BINARY_DIR}/pkgconfig/dmakit.pc)
install(CODE "
  set(DMAKIT_PC_TEMPLATE \"${PROJECT_SOURCE_DIR}/cmake/dmakit.pc.in\")
  set(DMAKIT_PC_OUTPUT \"${dmakit_pc_file}\")
  set(DMAKIT_PC_LIBDIR \"${CMAKE_INSTALL_LIBDIR}\")
  set(DMAKIT_PC_INCLUDEDIR \"${CMAKE_INSTALL_INCLUDEDIR}\")
  set(DMAKIT_PC_VERSION \"${PROJECT_VERSION}\")
  set(DMAKIT_PC_LIBS_PRIVATE \"${dmakit_pc_libs_private}\")
  include(\"${PROJECT_SOURCE_DIR}/cmake/dmakit-pc.cmake\")"
  COMPONENT dmakit_development)
install(FILES ${dmakit_pc_file}
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig COMPONENT dmakit_development)
